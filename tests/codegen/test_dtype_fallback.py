"""A build compiled in fp32 trains under bf16 autocast: generated permute and
unpermute ops fall back to the moec:: reference for a dtype they were not
generated for, forward and backward. GPU only: on CPU the ops always run the
reference."""
import pytest
import torch

import moec  # noqa: F401
from moec.codegen import permute as P

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the generated ops' CUDA path needs a GPU")


def test_other_dtype_runs_the_reference_forward_and_backward():
    torch.manual_seed(0)
    T, D, K, E = 64, 96, 2, 4
    perm = getattr(torch.ops.moec_kernels, P.module(P.permute_config(torch.float32, K, False)).NAME).default
    unperm = getattr(torch.ops.moec_kernels,
                     P.module(P.unpermute_config(torch.float32, torch.float32, K, False)).NAME).default
    idx = torch.randint(0, E, (T, K), device="cuda", dtype=torch.int32)
    row_map, _ = torch.ops.moec.route(idx, E, 0)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    out = unperm(perm(x, row_map, K), row_map, w)
    out.float().square().sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = torch.ops.moec.unpermute(torch.ops.moec.permute(x_ref, row_map, K), row_map, w_ref)
    ref.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(w.grad, w_ref.grad)

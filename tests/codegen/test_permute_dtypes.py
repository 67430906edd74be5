"""A build compiled in fp32 trains under bf16 autocast, where the experts hand
unpermute bf16 rows: the generated permute and unpermute ops run their Triton
kernels for every float dtype (a module is not specialised to one), and
float64 runs the moec:: reference. GPU only: on CPU the ops always run the
reference."""
import pytest
import torch

import moec  # noqa: F401
from moec.codegen import permute as P

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the generated ops' CUDA path needs a GPU")
T, D, K, E = 64, 96, 2, 4


def _ops():
    perm = P.module(P.permute_config(torch.float32, K, False)).OP
    unperm = P.module(P.unpermute_config(torch.float32, torch.float32, K, False)).OP
    row_map, _ = torch.ops.moec.route(torch.randint(0, E, (T, K), device="cuda", dtype=torch.int32), E, 0)
    return perm, unperm, row_map


def _run(perm, unperm, row_map, x, w):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = unperm(perm(x, row_map, K), row_map, w)
    out.float().square().sum().backward()
    return out, x.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_run_the_kernels_and_match_the_reference(dtype):
    torch.manual_seed(0)
    perm, unperm, row_map = _ops()
    x, w = torch.randn(T, D, device="cuda", dtype=dtype), torch.rand(T, K, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, gx, gw = _run(perm, unperm, row_map, x, w)
        torch.cuda.synchronize()
    names = {e.name for e in prof.events()}
    assert {"permute_kernel", "gather_sum_kernel", "unpermute_bwd_kernel"} <= names, sorted(names)
    ref, rx, rw = _run(torch.ops.moec.permute, torch.ops.moec.unpermute, row_map, x, w)
    assert out.dtype == dtype and gx.dtype == dtype and gw.dtype == torch.float32
    # both sum K products in fp32 and round once: only the summation order differs
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gx, rx, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-4 * D)


def test_float64_runs_the_reference():
    torch.manual_seed(0)
    perm, unperm, row_map = _ops()
    x, w = torch.randn(T, D, device="cuda", dtype=torch.float64), torch.rand(T, K, device="cuda", dtype=torch.float64)
    out, gx, gw = _run(perm, unperm, row_map, x, w)
    ref, rx, rw = _run(torch.ops.moec.permute, torch.ops.moec.unpermute, row_map, x, w)
    assert torch.equal(out, ref) and torch.equal(gx, rx) and torch.equal(gw, rw)

"""How close a kernel's float32 result must come to its reference, on the device it ran on."""
import torch

# a float32 dot on a GPU runs in TF32: operands keep 10 mantissa bits (unit roundoff 2**-11, about 5e-4
# per product as a norm); a backward result goes through up to three chained dots and the activation
TF32 = 10 * 2**-11


def assert_matches(got, want, exact=1e-4):
    """Compiled for a GPU, Triton's float32 dot is TF32, so the error is judged as a norm,
    ||got - want|| / ||want|| <= TF32; under the interpreter it is float32 arithmetic, held
    elementwise to `exact`."""
    want = want.to(got.device)
    if got.is_cuda:
        rel = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
        assert rel <= TF32, f"relative error {rel:.2e} is over TF32's {TF32:.1e}"
    else:
        torch.testing.assert_close(got.double(), want.double(), rtol=exact, atol=exact)

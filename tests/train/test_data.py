"""Token batches: training batches follow the seed, held-out batches do not."""
import torch

from moec.runtime import TokenData, load_tokens


def test_validation_batches_do_not_depend_on_the_seed():
    tokens = load_tokens(None)
    a, b = TokenData(tokens, 64, 0.05, seed=0), TokenData(tokens, 64, 0.05, seed=1)
    for step in range(3):
        assert torch.equal(a.batch("val", step, 4)[0], b.batch("val", step, 4)[0])
    assert not torch.equal(a.batch("train", 0, 4)[0], b.batch("train", 0, 4)[0])
    assert not torch.equal(a.batch("val", 0, 4)[0], a.batch("val", 1, 4)[0])

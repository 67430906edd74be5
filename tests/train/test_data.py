"""Token batches: training batches follow the seed, held-out batches do not; a step's global batch and its
micro-batches are the same at any data-parallel width."""
import pytest
import torch

from moec.runtime import TokenData, load_tokens


def test_validation_batches_do_not_depend_on_the_seed():
    tokens = load_tokens(None)
    a, b = TokenData(tokens, 64, 0.05, seed=0), TokenData(tokens, 64, 0.05, seed=1)
    for step in range(3):
        assert torch.equal(a.batch("val", step, 4)[0], b.batch("val", step, 4)[0])
    assert not torch.equal(a.batch("train", 0, 4)[0], b.batch("train", 0, 4)[0])
    assert not torch.equal(a.batch("val", 0, 4)[0], a.batch("val", 1, 4)[0])


def test_the_global_batch_and_its_micro_batches_are_the_same_at_any_data_parallel_width():
    data = TokenData(load_tokens(None), 16, 0.05, seed=0)
    whole = data.batch("train", 3, 8, micro_batches=2)[0]
    for world in (2, 4):
        shares = [data.batch("train", 3, 8 // world, rank, world, micro_batches=2)[0] for rank in range(world)]
        for micro in range(2):
            assert torch.equal(torch.cat([s.chunk(2)[micro] for s in shares]), whole.chunk(2)[micro])
    with pytest.raises(ValueError, match="3 sequences do not split into 2 equal micro-batches"):
        data.batch("train", 0, 3, micro_batches=2)

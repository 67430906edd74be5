"""The collective trace train.py's --debug-collectives writes: what it records on a process group of one, and
the disagreements between ranks' records it finds (the runs of several processes compare theirs with it)."""
import torch
import torch.distributed as dist

from moec.runtime.distributed import exchange
from moec.runtime.distributed.trace import CollectiveTrace, agreement


def test_records_collectives_by_group_with_their_sizes_and_restores_torch():
    before = dist.all_reduce, dist.isend
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with CollectiveTrace() as trace:
            dist.all_reduce(torch.ones(3))
            exchange.all_gather(torch.empty(2), torch.ones(2), dist.new_group([0]))
            dist.all_to_all_single(torch.empty(1), torch.ones(1))
            dist.P2POp(dist.isend, torch.ones(1), 0)  # the pipeline schedules' transfers still build
        world, other = trace.groups
    finally:
        dist.destroy_process_group()
    assert (dist.all_reduce, dist.isend) == before
    assert trace.collectives == [["all_reduce", world, 3], [exchange.ALL_GATHER, other, 2],
                                 ["all_to_all_single", world, None]]
    assert trace.groups == {world: [0], other: [0]}


def _record(groups, collectives, transfers=()):
    return {"groups": groups, "collectives": collectives, "transfers": list(transfers)}


def test_agreement_names_a_group_whose_ranks_issued_different_collectives_and_an_unmatched_send():
    ep = {"ep0": [0, 1]}
    calls = [["all_to_all_single", "ep0", None], ["all_reduce", "ep0", 4]]
    same = {0: _record(ep, calls, [["send", 1, 8]]), 1: _record(ep, calls, [["recv", 0, 8]])}
    assert agreement(same) == []
    fewer = {**same, 1: _record(ep, calls[:1], [["recv", 0, 8]])}
    assert agreement(fewer) == ["group ep0 (ranks [0, 1]): rank 0 issued 2; rank 1 issued 1"]
    resized = {**same, 1: _record(ep, [calls[0], ["all_reduce", "ep0", 5]], [["recv", 0, 8]])}
    assert agreement(resized) == ["group ep0 (ranks [0, 1]): rank 0 issued 2; rank 1 issued 2"]
    unmatched = {**same, 0: _record(ep, calls, [["send", 1, 8], ["send", 1, 8]])}
    assert agreement(unmatched) == ["rank 0 sent 2 transfers to rank 1, which received 1"]

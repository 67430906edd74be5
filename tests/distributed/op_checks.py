"""Op-level checks of moec::dispatch/combine on crafted routings, run inside each
torchrun process: every expert scales its rows by (global expert index + 1),
so the round trip must give x * (e + 1) on used rows, zero on the unused tail,
and the same factor in the gradient."""
import torch
import torch.distributed as dist

from moec.runtime.distributed import groups
from moec.runtime.distributed.mesh import build_mesh

ops = torch.ops.moec
D = 3


def _case(name: str, rank: int, E: int):
    """(experts of the used rows, sorted; unused tail rows) for this rank."""
    g = torch.Generator().manual_seed(rank)
    if name == "empty_rank":  # rank 0 sends nothing and has no rows at all
        if rank == 0:
            return torch.zeros(0, dtype=torch.long), 0
        return torch.randint(0, E, (5,), generator=g).sort().values, 2
    if name == "empty_experts":  # only even experts get rows, and no rows go to the last rank's experts
        return (2 * torch.randint(0, E // 2 - 1, (6,), generator=g)).sort().values, 1
    if name == "one_remote_expert":  # the whole batch of every rank goes to the last expert
        return torch.full((7,), E - 1), 0
    return torch.randint(0, E, (9,), generator=g).sort().values, 3


def check(name: str, ep: int, node_size: int) -> bool:
    rank = dist.get_rank()
    build_mesh(ep, node_size)
    me, L = dist.get_rank(groups.get("ep")), 2
    E = L * ep
    experts, tail = _case(name, rank, E)
    counts = torch.bincount(experts, minlength=E)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    x = torch.randn(len(experts) + tail, D, generator=torch.Generator().manual_seed(10 + rank), requires_grad=True)
    rows, local, C = ops.dispatch(x, offsets, ep, node_size)
    scale = torch.repeat_interleave(torch.arange(L) + me * L + 1.0, (local[1:] - local[:-1]).long())
    out = ops.combine(rows * scale[:, None], C, x.shape[0], ep, node_size)
    factor = torch.cat([experts + 1.0, torch.zeros(tail)])[:, None]
    ok = torch.equal(out, x.detach() * factor)
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    ok = ok and torch.allclose(x.grad, w * factor) and rows.shape[0] == int(C[:, me * L:(me + 1) * L].sum())
    flag = torch.tensor([float(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def check_rbd(ep: int = 4, node_size: int = 2, T: int = 6, K: int = 2) -> bool:
    """dispatch_rbd gives hierarchical dispatch's rows and gradients, and sends fewer rows between nodes:
    token 0 goes to experts 4 and 6, both on node 1."""
    rank = dist.get_rank()
    build_mesh(ep, node_size)
    E = 2 * ep
    g = torch.Generator().manual_seed(rank)
    first = torch.randint(0, E, (T,), generator=g)
    first[0] = 4
    indices = torch.stack([first, (first + 2) % E], 1).to(torch.int32)
    row_map, offsets = ops.route(indices, E, 0)
    x = torch.randn(T, D, generator=g, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    rows, local, C = ops.dispatch(ops.permute(x, row_map, K), offsets, ep, node_size)
    rows2, local2, C2, U, _ = ops.dispatch_rbd(x2, row_map, offsets, K, ep, node_size)
    ok = torch.equal(rows, rows2) and torch.equal(local, local2) and torch.equal(C, C2)
    w = torch.randn(rows.shape, generator=torch.Generator().manual_seed(50 + rank))
    (rows * w).sum().backward()
    (rows2 * w).sum().backward()
    ok = ok and torch.allclose(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    me, node, L = dist.get_rank(groups.get("ep")), dist.get_rank(groups.get("ep")) // node_size, 2
    per_node = C[me].view(ep // node_size, node_size * L).sum(1)  # rows hierarchical sends to each node
    crossing = torch.tensor([float(per_node.sum() - per_node[node]), float(U[me].sum() - U[me, node])])
    dist.all_reduce(crossing)
    flag = torch.tensor([float(ok and crossing[1] < crossing[0])])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def run_all() -> dict:
    world = dist.get_world_size()
    layouts = [("flat", world, 0)] + ([("hierarchical", 4, 2), ("ep2_dp2", 2, 0)] if world == 4 else [])
    out = {f"ops:{layout}:{case}": check(case, ep, node_size)
           for layout, ep, node_size in layouts
           for case in ("random", "empty_rank", "empty_experts", "one_remote_expert")}
    if world == 4:
        out["ops:rbd:same_rows_fewer_crossing"] = check_rbd()
    return out

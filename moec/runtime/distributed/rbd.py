"""moec::dispatch_rbd: redundancy-bypassing dispatch (X-MoE's RBD).

Legend: T tokens, K top-k, D hidden, E experts, P = EP ranks, G ranks per
node, L = E/P local experts; rank (n, g) = node n, local index g.

Flat or hierarchical dispatch sends one row per (token, expert): a token
routed to three experts of one remote node crosses the inter-node link three
times. Here rank (n, g) sends each token once to each node n' that holds any
of its experts, to rank (n', g), with the token's row positions (ints); that
relay copies it into one row per expert, and an all-to-all inside node n'
takes the rows to their experts. The rows arrive exactly as flat dispatch
lays them out (local expert, then source rank, then slot), so moec::experts
and moec::combine (hierarchical, rows individually) follow unchanged.
Backward is the adjoint: gradients of the copies are summed at the relay and
cross the inter-node link once per token. Host syncs: the count matrices
(one all-gather) and row_map's copy to the host.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from moec.runtime.distributed import exchange, groups


def _source(row_map: Tensor, offsets: Tensor, k: int, P: int, G: int):
    """Per destination node: the unique tokens sent [host] and each row's position among them."""
    E = offsets.shape[0] - 1
    L, nodes = E // P, P // G
    off = offsets.cpu().long()
    rm = row_map.cpu().long()
    slot_of_row = torch.empty(int(off[-1]), dtype=torch.long)
    keep = rm >= 0
    slot_of_row[rm[keep]] = torch.arange(rm.numel())[keep]
    token = slot_of_row // k
    send, pos, unique = [], [], []
    for node in range(nodes):
        rows = token[off[node * G * L]:off[(node + 1) * G * L]]  # experts of a node are contiguous rows
        u, inv = torch.unique(rows, sorted=True, return_inverse=True)
        send.append(u)
        pos.append(inv)
        unique.append(u.numel())
    return torch.cat(send), torch.cat(pos), unique


def _counts(offsets: Tensor, unique: list, P: int):
    """(C [P, E], U [P, nodes]) on the host, with one all-gather over "ep"."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)
    mine = torch.cat([counts, torch.tensor(unique, dtype=torch.int64, device=counts.device)])
    out = mine.new_empty(P * mine.numel())
    exchange.all_gather(out, mine, groups.get("ep"))
    out = out.cpu().view(P, -1)
    return out[:, :counts.numel()].contiguous(), out[:, counts.numel():].contiguous()


def _plan(C: Tensor, U: Tensor, me: int, G: int, n_tokens: int, tok_idx: Tensor, relay_idx: Tensor) -> list:
    P, E = C.shape
    L, nodes, n, g = E // P, P // G, me // G, me % G
    Cv = C.view(nodes, G, nodes, G, L)  # [src node, src local, dst node, dst local, expert]
    from_nodes = U.view(nodes, G, nodes)[:, g, n]  # tokens relay me receives from each node
    at_relay = Cv[:, g, n].sum(-1)  # [src node, dst local]: rows the relay makes for each local rank
    to_me = Cv[:, :, n, me % G].sum(-1)  # [src node, src local]: rows arriving for my experts
    return [("gather", tok_idx, n_tokens),
            ("a2a", "ep_inter", U[me].tolist(), from_nodes.tolist()),
            ("gather", relay_idx, int(from_nodes.sum())),
            ("reorder", at_relay),
            ("a2a", "ep_intra", at_relay.sum(0).tolist(), to_me.sum(0).tolist()),
            ("reorder", to_me.t()),
            ("reorder", C[:, me * L:(me + 1) * L])]


def _relay_positions(pos: Tensor, C: Tensor, U: Tensor, me: int, G: int) -> Tensor:
    """Each arriving row's token in the relay's token buffer (the rows' positions, exchanged)."""
    P, E = C.shape
    L, nodes, n, g = E // P, P // G, me // G, me % G
    Cv = C.view(nodes, G, nodes, G * L)
    send = Cv[n, g].sum(-1)  # rows I send to each node
    recv = Cv[:, g, n].sum(-1)  # rows each node's rank g sends to my node
    got = exchange.all_to_all(pos.unsqueeze(1), "ep_inter", send.tolist(), recv.tolist()).squeeze(1).cpu()
    tok_start = torch.cumsum(U.view(nodes, G, nodes)[:, g, n], 0) - U.view(nodes, G, nodes)[:, g, n]
    return got + torch.repeat_interleave(tok_start, recv)


def _me() -> int:
    return dist.get_rank(groups.get("ep"))


@torch.library.custom_op("moec::dispatch_rbd", mutates_args=())
def dispatch_rbd(x: Tensor, row_map: Tensor, offsets: Tensor, k: int, ep_size: int,
                 node_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """tokens x [T, D] and their routing (row_map, offsets) -> rows [M, D] grouped by local expert,
    local offsets [L+1], C [P, E] (for combine), and for backward U [P, nodes] (tokens sent per node)
    and the relay's copy index [R]."""
    n = groups.check_ep("ep", ep_size)
    if n == 1:  # one process: what permute computes, with every expert local
        rows = torch.ops.moec.permute(x, row_map, k)[:int(offsets[-1])]
        C = (offsets[1:] - offsets[:-1]).to(torch.int64).cpu().unsqueeze(0)
        return rows, offsets.clone(), C, C.new_zeros(1, 1), row_map.new_zeros(0, dtype=torch.int64)
    tok_idx, pos, unique = _source(row_map, offsets, k, n, node_size)
    C, U = _counts(offsets, unique, n)  # the layer's host sync
    me = _me()
    relay_idx = _relay_positions(pos.to(x.device), C, U, me, node_size)
    rows = exchange.forward(x, _plan(C, U, me, node_size, x.shape[0], tok_idx, relay_idx))
    L = C.shape[1] // n
    mine = C[:, me * L:(me + 1) * L].sum(0)
    local = torch.cat([mine.new_zeros(1), torch.cumsum(mine, 0)]).to(device=offsets.device, dtype=offsets.dtype)
    return rows, local, C, U, relay_idx.to(x.device)


@dispatch_rbd.register_fake
def _(x, row_map, offsets, k, ep_size, node_size):
    ctx = torch.library.get_ctx()
    E = offsets.shape[0] - 1
    return (x.new_empty(ctx.new_dynamic_size(), x.shape[1]), offsets.new_empty(E // ep_size + 1),
            torch.empty(ep_size, E, dtype=torch.int64, device="cpu"),
            torch.empty(ep_size, ep_size // max(node_size, 1), dtype=torch.int64, device="cpu"),
            row_map.new_empty(ctx.new_dynamic_size(), dtype=torch.int64))


def _setup(ctx, inputs, output):
    x, row_map, offsets, k, ep_size, node_size = inputs
    ctx.save_for_backward(row_map, offsets, output[2], output[3], output[4])
    ctx.k, ctx.ep_size, ctx.node_size, ctx.n_tokens = k, ep_size, node_size, x.shape[0]


def _backward(ctx, g_rows, *_):
    row_map, offsets, C, U, relay_idx = ctx.saved_tensors
    g_rows = g_rows.contiguous()
    if groups.check_ep("ep", ctx.ep_size) == 1:
        rows = torch.cat([g_rows, g_rows.new_zeros(row_map.numel() - g_rows.shape[0], g_rows.shape[1])])
        w = torch.ones(row_map.numel() // ctx.k, ctx.k, dtype=g_rows.dtype, device=g_rows.device)
        return torch.ops.moec.unpermute(rows, row_map, w), None, None, None, None, None
    tok_idx, _, _ = _source(row_map, offsets, ctx.k, ctx.ep_size, ctx.node_size)
    plan = _plan(C, U, _me(), ctx.node_size, ctx.n_tokens, tok_idx, relay_idx)
    return exchange.inverse(g_rows, plan), None, None, None, None, None


dispatch_rbd.register_autograd(_backward, setup_context=_setup)

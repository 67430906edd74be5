"""Moving expert-grouped rows between the ranks of an EP group.

Legend: N rows of the grouped buffer (T*K), D hidden, E experts, P = EP
ranks, L = E/P local experts, G ranks per node.

Every rank learns the whole count matrix C [P, E] (C[i, e]: rows rank i
sends to expert e) with one all-gather; that is the one host sync of a
layer, needed because all_to_all_single takes its split sizes on the host.
From C every rank derives the same list of stages, so the collectives a rank
issues are a function of the graph alone, never of the data: ranks cannot
disagree on their order. A stage is a block reorder (rows in blocks ordered
(a, b) -> (b, a)) or an all-to-all over a named group; running the stages
backwards, each inverted, is the way back (combine, and each op's backward).
A gather stage (rbd.py's copies on arrival) runs back as a sum of the copies.

flat:          reorder-free a2a over "ep", then sort the blocks (src, expert)
               -> (expert, src) for the experts op.
hierarchical:  (Tutel's 2D all-to-all) a2a inside the node ("ep_intra") with
               rows for all nodes' rank g gathered at local rank g, then a2a
               between nodes ("ep_inter"): P/G inter-node messages per rank
               instead of P - G, each G times larger. The rows arrive in the
               same order as flat's.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from moec.runtime.distributed import groups

# torch 2.13 deprecates all_gather_into_tensor (a FutureWarning a call) for all_gather_single, which older torch
# lacks; looked up at each call, as the collective trace patches the module
ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"


def all_gather(out: Tensor, x: Tensor, group) -> None:
    """out: the ranks' x one after another, flat."""
    getattr(dist, ALL_GATHER)(out, x, group=group)


def gather_counts(offsets: Tensor, ep: int) -> Tensor:
    """C [P, E] int64 on the host: every rank's per-expert row counts."""
    counts = (offsets[1:] - offsets[:-1]).to(torch.int64)  # [E]
    if ep == 1:
        return counts.cpu().unsqueeze(0)
    out = counts.new_empty(ep * counts.numel())  # flat: gloo takes no [P, E] output
    all_gather(out, counts, groups.get("ep"))
    return out.cpu().view(ep, -1)


def _excl(t: Tensor) -> Tensor:
    return torch.cumsum(t, 0) - t


def reorder(x: Tensor, lengths: Tensor) -> Tensor:
    """Rows in blocks ordered (a, b) with lengths [A, B] -> blocks ordered (b, a)."""
    A, B = lengths.shape
    if A == 1 or B == 1:
        return x
    starts = _excl(lengths.flatten()).view(A, B).t().flatten()
    lt = lengths.t().flatten()
    idx = torch.repeat_interleave(starts - _excl(lt), lt) + torch.arange(int(lt.sum()))
    return x[idx.to(x.device, non_blocking=True)]


def all_to_all(x: Tensor, group: str, send: list, recv: list) -> Tensor:
    out = x.new_empty(sum(recv), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=groups.get(group))
    return out


def stages(C: Tensor, me: int, node_size: int) -> list:
    """The forward stages for this rank (its index me in the EP group)."""
    P, E = C.shape
    L = E // P
    S = C.view(P, P, L).sum(-1)  # S[i, j]: rows rank i sends rank j
    last = ("reorder", C[:, me * L:(me + 1) * L])  # [P, L]: (src, expert) -> (expert, src)
    if P == 1:
        return []
    G = node_size if 1 < node_size < P else P
    if G == P:
        return [("a2a", "ep", S[me].tolist(), S[:, me].tolist()), last]
    n, g, nodes = me // G, me % G, P // G
    Sv = S.view(nodes, G, nodes, G)  # [src node, src local, dst node, dst local]
    to_peer = Sv[n, g]  # [dst node, dst local]
    from_peers = Sv[n, :, :, g]  # [src local, dst node]: what my node's ranks send via me
    to_me = Sv[:, :, n, g]  # [src node, src local]
    return [("reorder", to_peer), ("a2a", "ep_intra", to_peer.sum(0).tolist(), from_peers.sum(1).tolist()),
            ("reorder", from_peers), ("a2a", "ep_inter", from_peers.sum(0).tolist(), to_me.sum(1).tolist()),
            last]


def forward(x: Tensor, plan: list) -> Tensor:
    for kind, *a in plan:
        if kind == "gather":  # rows idx of a [n, D] buffer (a row may be taken several times)
            x = x[a[0].to(x.device)]
        else:
            x = reorder(x, a[0]) if kind == "reorder" else all_to_all(x, *a)
    return x


def inverse(y: Tensor, plan: list) -> Tensor:
    """The adjoint of forward: its inverse for the permutations and all-to-alls, and for a
    gather the sum of each row's copies (what the gather's backward is)."""
    for kind, *a in reversed(plan):
        if kind == "gather":
            idx, n = a
            y = y.new_zeros(n, *y.shape[1:]).index_add_(0, idx.to(y.device), y)
        elif kind == "reorder":
            y = reorder(y, a[0].t())
        else:
            group, send, recv = a
            y = all_to_all(y, group, recv, send)
    return y

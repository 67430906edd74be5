"""The device mesh of an expert-parallel run and the named groups the graph's collectives use.

Ranks are laid out as a (pp, dp, ep, tp) DeviceMesh, tp fastest: rank =
((p * DP + d) * EP + j) * TP + t, so a TP group is TP consecutive ranks (its
all-reduces, one per attention and FFN, stay inside a node), an EP group is
EP ranks TP apart (torchrun's local ranks fill a node first, and the
all-to-all stays inside a node when EP x TP fits in one), and the stages of
a pipeline are DP * EP * TP ranks apart. The ranks of a TP group read the
same data and hold the same experts.
Groups registered for the ops:
  "tp"        the TP ranks of this rank (mesh dim "tp"; only with TP > 1)
  "ep"        the EP ranks of this rank's replica (mesh dim "ep")
  "ep_dp"     the ranks holding the same experts (mesh dim "dp"): expert
              gradients are reduced here
  "data"      the ranks running the same pipeline stage with the same TP
              index (every rank without pipelining and TP; each sees
              different data): the other gradients are reduced here
  "pp"        the stages of this rank's pipeline (mesh dim "pp")
  "ep_intra", "ep_inter"  with node_size G: the ranks of the EP group on this
              node, and the ranks of the EP group with this rank's local index
              on the other nodes (hierarchical all-to-all)
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moec.base.errors import MoecError
from moec.runtime.distributed import groups


def build_mesh(ep: int, node_size: int = 0, pp: int = 1, tp: int = 1) -> DeviceMesh:
    world = dist.get_world_size()
    if world % (ep * pp * tp):
        raise MoecError(f"EP={ep} x PP={pp} x TP={tp} does not divide the {world} ranks; run a multiple of "
                        f"{ep * pp * tp} processes")
    device = "cuda" if dist.get_backend() != "gloo" else "cpu"
    per_stage = world // pp
    grid = init_device_mesh(device, (pp, per_stage // (ep * tp), ep, tp), mesh_dim_names=("pp", "dp", "ep", "tp"))
    mesh = grid["dp", "ep", "tp"] if tp > 1 else grid["dp", "ep"]  # a stage's parameters' layout (checkpoints)
    groups.clear()
    groups.register("ep", grid.get_group("ep"))
    groups.register("ep_dp", grid.get_group("dp"))
    data = dist.group.WORLD
    if tp > 1:
        groups.register("tp", grid.get_group("tp"))
    if pp > 1:
        groups.register("pp", grid.get_group("pp"))
    if pp > 1 or tp > 1:
        for p in range(pp):  # every rank makes every group, in the same order
            for t in range(tp):
                group = dist.new_group(list(range(p * per_stage + t, (p + 1) * per_stage, tp)))
                if dist.get_rank() // per_stage == p and dist.get_rank() % tp == t:
                    data = group
    groups.register("data", data)
    if 1 < node_size < ep:
        if ep % node_size:
            raise MoecError(f"node size {node_size} does not divide EP={ep}; pick a node size that divides it")
        nodes = DeviceMesh(device, torch.arange(world).view(world // ep, ep // node_size, node_size),
                           mesh_dim_names=("dp", "ep_inter", "ep_intra"))
        groups.register("ep_intra", nodes.get_group("ep_intra"))
        groups.register("ep_inter", nodes.get_group("ep_inter"))
    return mesh

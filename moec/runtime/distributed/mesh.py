"""The device mesh of an expert-parallel run and the named groups the graph's collectives use.

Ranks are laid out as a (pp, dp, ep) DeviceMesh, ep fastest: rank =
(p * DP + d) * EP + j, so an EP group is EP consecutive ranks (torchrun's
local ranks fill a node first, and the all-to-all stays inside a node when EP
fits in one), and the stages of a pipeline are DP * EP ranks apart. A tp
dimension is not built yet: the compiler refuses plans that need one.
Groups registered for the ops:
  "ep"        the EP ranks of this rank's replica (mesh dim "ep")
  "ep_dp"     the ranks holding the same experts (mesh dim "dp"): expert
              gradients are reduced here
  "data"      the ranks running the same pipeline stage (every rank without
              pipelining; each sees different data): the other gradients
              are reduced here
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


def build_mesh(ep: int, node_size: int = 0, pp: int = 1) -> DeviceMesh:
    world = dist.get_world_size()
    if world % (ep * pp):
        raise MoecError(f"EP={ep} x PP={pp} does not divide the {world} ranks; run a multiple of {ep * pp} processes")
    device = "cuda" if dist.get_backend() != "gloo" else "cpu"
    per_stage = world // pp
    grid = init_device_mesh(device, (pp, per_stage // ep, ep), mesh_dim_names=("pp", "dp", "ep"))
    mesh = grid["dp", "ep"]  # what a stage's parameters are laid out on (checkpoints)
    groups.clear()
    groups.register("ep", mesh.get_group("ep"))
    groups.register("ep_dp", mesh.get_group("dp"))
    data = dist.group.WORLD
    if pp > 1:
        groups.register("pp", grid.get_group("pp"))
        for p in range(pp):  # every rank makes every group, in the same order
            group = dist.new_group(list(range(p * per_stage, (p + 1) * per_stage)))
            if dist.get_rank() // per_stage == p:
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

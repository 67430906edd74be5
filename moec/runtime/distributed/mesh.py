"""The device mesh of an expert-parallel run and the named groups the graph's collectives use.

Ranks are laid out as a (dp, ep) DeviceMesh, ep fastest: rank = d * EP + j,
so an EP group is EP consecutive ranks (torchrun's local ranks fill a node
first, and the all-to-all stays inside a node when EP fits in one). A mesh of
more dimensions (tp, pp) is not built yet: setup refuses plans that need one.
Groups registered for the ops:
  "ep"        the EP ranks of this rank's replica (mesh dim "ep")
  "ep_dp"     the ranks holding the same experts (mesh dim "dp"): expert
              gradients are reduced here
  "data"      every rank (all of them see different data): the other
              gradients and the load-balancing counts are reduced here
  "ep_intra", "ep_inter"  with node_size G: the ranks of the EP group on this
              node, and the ranks of the EP group with this rank's local index
              on the other nodes (hierarchical all-to-all)
"""
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moec.base.errors import MoecError
from moec.runtime.distributed import groups


def build_mesh(ep: int, node_size: int = 0) -> DeviceMesh:
    world = dist.get_world_size()
    if world % ep:
        raise MoecError(f"EP={ep} does not divide the {world} ranks; run a multiple of {ep} processes")
    device = "cuda" if dist.get_backend() != "gloo" else "cpu"
    mesh = init_device_mesh(device, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    groups.clear()
    groups.register("ep", mesh.get_group("ep"))
    groups.register("ep_dp", mesh.get_group("dp"))
    groups.register("data", dist.group.WORLD)
    if 1 < node_size < ep:
        if ep % node_size:
            raise MoecError(f"node size {node_size} does not divide EP={ep}; pick a node size that divides it")
        nodes = DeviceMesh(device, torch.arange(world).view(world // ep, ep // node_size, node_size),
                           mesh_dim_names=("dp", "ep_inter", "ep_intra"))
        groups.register("ep_intra", nodes.get_group("ep_intra"))
        groups.register("ep_inter", nodes.get_group("ep_inter"))
    return mesh

"""The moec:: custom ops a compiled graph calls: routing (gate, route, permute,
unpermute), the experts, the MoE layer before lowering and its losses, and
opaque calls into a model file (the collectives of expert parallelism are in
moec.runtime.distributed). Importing moec.runtime registers all of them."""
from moec.runtime.ops import experts, moe, opaque, routing  # noqa: F401

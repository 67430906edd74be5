"""Expert parallelism at run time: the collectives the graph calls, the mesh
and its named groups, expert sharding, gradient sync and resharding
checkpoints. A training loop calls `setup` once after building the model
and loading its weights, then `grad_sync()` after every backward."""
from moec.distributed import ops, overlap, rbd  # noqa: F401  registers the EP ops (dispatch, combine, ...)
from moec.distributed.setup import setup  # noqa: F401

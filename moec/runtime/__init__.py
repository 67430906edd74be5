"""What an emitted program imports, and nothing of the compiler: the moec::
ops (importing this package registers them), building a model's parameters
from its declaration, its weights and generated kernels, and what train.py
trains it with (moec.runtime.training, moec.runtime.distributed)."""
from moec.runtime import distributed, ops  # noqa: F401  registers the moec:: ops the graph calls
from moec.runtime.kernels.generated import load_build as load_kernels  # noqa: F401
from moec.runtime.training.balance import ExpertBias  # noqa: F401
from moec.runtime.training.checkpoint import Checkpointer  # noqa: F401
from moec.runtime.training.data import TokenData, load_tokens, to_device  # noqa: F401
from moec.runtime.training.divergence import LossGuard  # noqa: F401
from moec.runtime.training.flags import check_flags, compiles  # noqa: F401
from moec.runtime.training.loop import (StopOnSignal, export_weights, rng_state, run_main,  # noqa: F401
                                        setup_distributed, teardown, unwrap)
from moec.runtime.training.parallel import check_world, parallelize, wrap  # noqa: F401
from moec.runtime.training.recompute import recompute  # noqa: F401
from moec.runtime.training.resume import resume  # noqa: F401
from moec.runtime.training.rundir import RunDir  # noqa: F401
from moec.runtime.training.runlog import BuildInfo, RunLog, check_vocab  # noqa: F401
from moec.runtime.training.schedule import scheduler as warmup_cosine_scheduler  # noqa: F401
from moec.runtime.distributed.setup import local_experts  # noqa: F401
from moec.runtime.weights import declare, load_build, load_state, load_weights  # noqa: F401

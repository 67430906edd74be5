"""torchrun as the tests start it."""
import sys

# torch's launcher, what `torchrun` runs, with the objects its imports make frozen: collecting among them frees
# nothing, and the interpreter's last collection at its exit no longer walks them (about a second of a launch
# on a machine of two cores, where the tests start a few dozen).
TORCHRUN = [sys.executable, "-c", "import gc; gc.disable(); import torch.distributed.run as run; gc.freeze(); "
            "gc.enable(); run.main()"]

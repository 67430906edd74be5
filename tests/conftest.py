"""Where the Triton kernels run: compiled on a GPU; with none, under the interpreter on CPU tensors.
Decided once, here, before any test module imports triton, so one pytest run on a GPU machine compiles
every kernel it tests."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

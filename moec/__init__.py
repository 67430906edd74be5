"""moec: a compiler from dense PyTorch transformers to Mixture-of-Experts training programs.

Floors, bottom up (tests/test_layers.py enforces them):
  moec.base      errors, graph helpers, names shared by every layer
  moec.runtime   what an emitted program imports: the moec:: ops, kernels, training, distributed
  moec.passes, moec.codegen, moec.cost_model   compile time (the cost model needs no torch)
  moec.driver    the CLI, capture, the compiler and its pass pipeline
"""

__version__ = "0.1.0"

from moec.base.errors import MoecError  # noqa: E402,F401

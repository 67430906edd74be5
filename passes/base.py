"""What every pass is: a named callable GraphModule -> PassResult.

A pass reads only its own options (given at construction), never global
state, and raises MoecError naming itself for input it cannot handle.
"""
from dataclasses import dataclass

import torch.fx


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


class Pass:
    name = "pass"

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

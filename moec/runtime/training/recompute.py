"""Whole-layer activation recomputation (`moec compile --recompute`): model.py's layer loop calls each
layer through `recompute`, which keeps only the layer's inputs for backward and runs the layer's forward
again there (torch.utils.checkpoint, non-reentrant) to get the activations its backward reads.

The layer's outputs are the forward's: its detached side outputs (expert counts, router inputs) keep
the values the forward computed, and its aux and z losses get their gradients through the recomputed
graph. The recomputation runs the whole layer, never stopping at the last activation backward needs,
so an expert-parallel layer's all-to-alls run again in backward on every rank, in the same order.
Under torch.compile the layer is traced as one checkpointed region (no graph break) and the compiled
backward recomputes what the partitioner chooses.
Forwards without grad (evaluation, no_grad) and in eval mode run the layer plain."""
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop


def recompute(layer: torch.nn.Module, *args):
    """layer(*args), keeping only args for backward when the forward builds a graph to train."""
    if not (torch.is_grad_enabled() and layer.training):
        return layer(*args)
    if torch.compiler.is_compiling():  # traced into the compiled graph, whose partitioner picks what to recompute
        return checkpoint(layer, *args, use_reentrant=False)
    with set_checkpoint_early_stop(False):  # every rank recomputes the layer's collectives, not a prefix
        return checkpoint(layer, *args, use_reentrant=False)

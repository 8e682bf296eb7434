"""Precise batch-norm statistics (``--precise-bn N``).

A batch norm's running statistics are an average over past batches, each computed with the
weights of its step. While the weights still move fast (early in a run, at a high rate) the
average lags behind them, and in a deep stack of adder layers, each normalised by its own
batch norm, the lag compounds: the model evaluated with its running statistics is far worse
than the same weights with statistics of their own (adder VDSR 10 x 32, step 250 of 5,000:
Set5 x2 23.2 dB with the running statistics, 32.7 with recomputed ones; docs/training.md).
Before validation and export the trainer can recompute them: the mean over ``N`` training
batches of the current weights (in train mode, without gradients).
"""

import torch
from torch import nn


def bn_layers(model):
    """The batch norms of ``model``."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recompute(model, forward, batches):
    """Replace the running statistics of every batch norm of ``model`` by their mean over the
    batches that ``forward(batch)`` passes through it; returns how many layers were set.
    Momentum and the train / eval mode are restored."""
    layers = bn_layers(model)
    if not layers:
        return 0
    momenta, training = [m.momentum for m in layers], model.training
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    try:
        for batch in batches:
            forward(batch)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(training)
    return len(layers)

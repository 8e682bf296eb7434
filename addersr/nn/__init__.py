"""Layers: the adder convolution, AdderNet's adaptive learning rate and AdderSR's blocks."""

from .adder import AdaptiveLR, Adder2d, adaptive_lr, adder_weights, rescale_adder_grads
from .blocks import AdderSRLayer, PowerActivation, hidden_layer

__all__ = ["AdaptiveLR", "Adder2d", "AdderSRLayer", "PowerActivation", "adaptive_lr",
           "adder_weights", "hidden_layer", "rescale_adder_grads"]

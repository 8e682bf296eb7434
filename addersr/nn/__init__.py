"""Layers: the adder convolution and AdderNet's adaptive learning rate."""

from .adder import AdaptiveLR, Adder2d, adaptive_lr, adder_weights, rescale_adder_grads

__all__ = ["AdaptiveLR", "Adder2d", "adaptive_lr", "adder_weights", "rescale_adder_grads"]

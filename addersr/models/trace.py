"""Tracing which layers a model runs, on what sizes.

:func:`addersr.energy.count_ops` traces large images on the meta device: the model is
copied there (rebuilt from its registry config when it has one, so even the 43 M-parameter
EDSR costs no memory) and run on an empty input, adder layers replaced by a convolution of
the same geometry, which has the same output shape. :func:`receptive_radius` and the
tiling code trace a tiny real input instead: the first meta-device operations import
``torch._dynamo``, seconds that an upscaling call should not pay.
"""

import contextlib
import copy
import functools
import math

import torch
import torch.nn.functional as F

from ..nn import Adder2d


def _adder_shape(module, x):
    return F.conv2d(x, module.weight, None, module.stride, module.padding)


def meta_copy(model):
    """A copy of ``model`` on the meta device in eval mode, adder layers as shape proxies."""
    config = getattr(model, "config", None)
    if config is not None:
        from . import build
        with torch.device("meta"):
            meta = build(**config)
    else:
        meta = copy.deepcopy(model).to("meta")
    meta.eval()
    for m in meta.modules():
        if isinstance(m, Adder2d):
            m.forward = functools.partial(_adder_shape, m)
    return meta


@contextlib.contextmanager
def eval_mode(model):
    """Put ``model`` in eval mode for a block, then restore its training flag."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def trace(model, lr_size, channels=3, meta=True):
    """Every module call of ``model`` on one ``channels x h x w`` input, ``lr_size=(h, w)``.

    Returns a list of ``(qualified_name, module, inputs, output)`` in completion order
    (children before their parents). ``meta=True``: on a meta copy (shapes only, any size
    for free); ``meta=False``: on ``model`` itself with a zero input on its device (keep
    the size tiny).
    """
    target = meta_copy(model) if meta else model
    param = next(target.parameters())
    calls = []
    handles = [m.register_forward_hook(
        lambda mod, inputs, output, name=name: calls.append((name, mod, inputs, output)))
        for name, m in target.named_modules()]
    try:
        with torch.no_grad(), eval_mode(target):
            target(torch.zeros(1, channels, *lr_size, device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
    return calls


def receptive_radius(model):
    """LR pixels of context on each side that an output pixel of ``model`` depends on.

    The sum over every spatial layer of its reach ``dilation * (k - 1) / 2`` (and 2 input
    pixels for a bicubic resize), converted to LR pixels by the layer's input resolution,
    rounded up, plus one pixel of safety. Shortcuts only shorten paths, so this bounds the
    true receptive field; tiles that overlap by this much stitch exactly.
    """
    lr = 4
    reach = 0.0
    for _, m, inputs, _ in trace(model, (lr, lr), meta=False):
        in_size = inputs[0].shape[-1]
        if isinstance(m, (torch.nn.Conv2d, Adder2d)):
            k = m.kernel_size
            d = getattr(m, "dilation", (1, 1))
            pixels = max(d[i] * (k[i] - 1) / 2 for i in range(2))
        elif hasattr(m, "radius"):
            pixels = m.radius()
        else:
            continue
        reach += pixels * lr / in_size
    return math.ceil(reach - 1e-9) + 1

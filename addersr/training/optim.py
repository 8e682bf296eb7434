"""The optimisers of a run and the adder options that act on its parameters.

Options of adder layers alone: the adder weights' own learning rate (``--adder-lr``, a
multiple of ``--lr``) and initial scale (``--adder-init``), BN momentum and the power
activations' start and learning. AdderNet's adaptive rate (``--eta``) rescales the adder
gradients in :meth:`addersr.training.trainer.Trainer.step`.
"""

import torch


class Optimizers:
    """Several optimizers stepped as one: their groups, steps and states together."""

    def __init__(self, **parts):
        self.parts = parts

    @property
    def param_groups(self):
        return [group for opt in self.parts.values() for group in opt.param_groups]

    def zero_grad(self, set_to_none=True):
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        for opt in self.parts.values():
            opt.step()

    def state_dict(self):
        return {name: opt.state_dict() for name, opt in self.parts.items()}

    def load_state_dict(self, state):
        for name, opt in self.parts.items():
            opt.load_state_dict(state[name])


def build_optimizer(model, cfg):
    """Adam, SGD or both (sgd+adam: SGD for the adder weights, Adam at ``other_lr`` for the
    rest); the adder weights in their own group at ``adder_lr`` times the rate. Each group
    keeps its initial rate as ``base_lr`` (the schedule multiplies it)."""
    from ..nn import adder_weights
    adder = adder_weights(model) if cfg["op"] == "adder" else []
    ids = {id(p) for p in adder}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    other = {"params": rest, "base_lr": cfg["lr"], "name": "other"}
    groups = [{"params": adder, "base_lr": cfg["lr"] * cfg["adder_lr"], "name": "adder"}] if adder else []

    def sgd(groups):
        return torch.optim.SGD(groups, lr=groups[0]["base_lr"], momentum=0.9, weight_decay=cfg["weight_decay"])

    def adam(groups):
        return torch.optim.Adam(groups, lr=groups[0]["base_lr"], betas=(0.9, 0.999), eps=1e-8)

    if cfg["optimizer"] == "sgd+adam":
        return Optimizers(sgd=sgd(groups), adam=adam([dict(other, base_lr=cfg["other_lr"])]))
    groups = [other] + groups
    return sgd(groups) if cfg["optimizer"] == "sgd" else adam(groups)


@torch.no_grad()
def apply_adder_options(model, cfg, fresh):
    """Apply the adder options: BN momentum and whether the exponents learn always; the
    initial scale of adder weights, the power exponents and the gamma of the batch norm after
    each adder op only to a ``fresh`` model."""
    if cfg["op"] != "adder":
        return
    from ..nn import AdderSRLayer, PowerActivation, adder_weights
    for m in model.modules():
        if fresh and isinstance(m, AdderSRLayer):
            m.bn.weight.fill_(cfg["bn_init"])
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = cfg["bn_momentum"]
        elif isinstance(m, PowerActivation):
            if fresh:
                m.alpha.fill_(cfg["power_init"])
            m.alpha.requires_grad_(cfg["power_learn"])
    if fresh:
        for w in adder_weights(model):
            w.mul_(cfg["adder_init"])

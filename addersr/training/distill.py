"""Distillation from a trained teacher of the same scale (``--teacher WEIGHTS``).

An output-level L1 loss against the teacher's output (weight ``--distill``) and optionally
one between the outputs of the body's blocks of student and teacher (``--distill-features``;
the blocks must agree in number and shape).
"""

import torch
import torch.nn.functional as F

from .config import ConfigError


class BodyFeatures:
    """Outputs of each block of ``model.body``, collected by forward hooks."""

    def __init__(self, model):
        body = getattr(model, "body", None)
        if not isinstance(body, torch.nn.Sequential):
            raise ValueError(f"{type(model).__name__} has no body of blocks for feature distillation")
        self.outputs = []
        self.handles = [m.register_forward_hook(self._hook) for m in body]

    def _hook(self, module, inputs, output):
        self.outputs.append(output)

    def take(self):
        out, self.outputs = self.outputs, []
        return out


def load_teacher(cfg, device):
    """The frozen teacher ``cfg["teacher"]``; ValueError when its scale is not the run's."""
    from .. import models
    teacher = models.load(cfg["teacher"], device=device)
    if teacher.scale != cfg["scale"]:
        raise ValueError(f"the teacher {cfg['teacher']} is for x{teacher.scale}, the model for x{cfg['scale']}")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Distiller:
    """The teacher of a run and the distillation terms of its loss."""

    def __init__(self, cfg, model, device):
        self.teacher = load_teacher(cfg, device)
        self.weight, self.feature_weight = cfg["distill"], cfg["distill_features"]
        self.features = None
        if self.feature_weight > 0:
            self.features = (BodyFeatures(model), BodyFeatures(self.teacher))

    def check_features(self, model, device):
        """Feature distillation needs body blocks of the same number and shape in both networks."""
        if self.features is None:
            return
        x = torch.zeros(1, 3, 8, 8, device=device)
        with torch.no_grad():
            model.eval()
            model(x)
            self.teacher(x)
            model.train()
        student, teacher = self.features[0].take(), self.features[1].take()
        if len(student) != len(teacher) or any(a.shape != b.shape for a, b in zip(student, teacher)):
            raise ConfigError(
                f"--distill-features: the teacher's body has {len(teacher)} blocks of "
                f"{teacher[0].shape[1] if teacher else 0} channels, the model's {len(student)} of "
                f"{student[0].shape[1] if student else 0}; they must match")

    def drop_features(self):
        """Forget the block outputs that forwards outside training steps left."""
        for features in self.features or ():
            features.take()

    def add_loss(self, loss, lr, sr, target):
        """``loss`` plus the distillation terms for the student output ``sr`` of input ``lr``;
        ``target`` maps an output to what the loss compares (the Y channel for VDSR)."""
        with torch.no_grad():
            out = self.teacher(lr).float()
        loss = loss + self.weight * F.l1_loss(sr, target(out))
        if self.features is not None:
            student, teacher = self.features[0].take(), self.features[1].take()
            feat = sum(F.l1_loss(a.float(), b.float()) for a, b in zip(student, teacher)) / len(student)
            loss = loss + self.feature_weight * feat
        return loss

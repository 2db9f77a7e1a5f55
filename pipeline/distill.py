"""Distillation methods as compositions of loss terms around one student (METHOD.md §2, §3, §6).

`ours`: the backbone learns only from the feature loss against quality-selected teacher layers; the student's own
head after its deepest distilled layer learns from cross-entropy on DETACHED features at the same time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import InputError
from pipeline.layers import LayerChain, classifier_modules
from pipeline.losses import alignment, canonical, kd_kl, pool_to, similarity
from pipeline.projectors import PROJECTORS


@dataclass(frozen=True)
class Method:
    doc: str
    detach_head: bool = False  # cross-entropy trains only the head: the backbone is logit-free
    kl: bool = False           # Hinton KL on logits
    standardize_logits: bool = False
    features: str | None = None  # one2one | all | sp | semckd | simkd
    teacher_layers: str = "standard"  # standard (stage ends) | selected (quality metric)
    projector: str = "single"


METHODS = {
    "ce": Method("plain student: cross-entropy only, no teacher"),
    "vkd": Method("CE + tau^2 KL (Hinton)", kl=True),
    "vkd_std": Method("CE + tau^2 KL on z-scored logits", kl=True, standardize_logits=True),
    "base_fkd": Method("CE + KL + feature MSE on standard layers, one-to-one (FitNets-style)", kl=True,
                       features="one2one"),
    "base_fkd_nokl": Method("CE + feature MSE on standard layers", features="one2one"),
    "base_fkd_all": Method("CE + KL + feature MSE between every student and every teacher layer", kl=True,
                           features="all"),
    "stl_seplin": Method("feature MSE on standard layers; CE on the detached head (logit-free)",
                         detach_head=True, features="one2one"),
    "ours": Method("feature MSE on quality-selected layers; CE on the detached head (logit-free)",
                   detach_head=True, features="one2one", teacher_layers="selected"),
    "ours_ce": Method("CE + feature MSE on selected layers (CE reaches the backbone)", features="one2one",
                      teacher_layers="selected"),
    "ours_kl": Method("CE + KL + feature MSE on selected layers", kl=True, features="one2one",
                      teacher_layers="selected"),
    "sp": Method("CE + KL + similarity preservation on the whole B x B matrices, standard layers", kl=True,
                 features="sp"),
    "simkd": Method("CE + KL + feature MSE; logits from the frozen teacher tail on the projected last feature",
                    kl=True, features="simkd", projector="three"),
    "semckd": Method("CE + KL + attention-weighted feature MSE over all layer pairs", kl=True, features="semckd",
                     projector="three"),
}


def _total(values: list[torch.Tensor]) -> torch.Tensor:
    """Sum of loss terms, one add per extra term: `sum()` adds a 0 first and stack().sum() costs more in backward,
    and a small-batch step is bound by kernel launches."""
    return sum(values[1:], values[0])


@dataclass(frozen=True)
class LossWeights:
    ce: float = 1.0
    kl: float = 16.0
    tau: float = 4.0
    feature: float = 1.0
    relation: float = 0.0  # beyond the paper: match batch similarity structure of projected features


class AttentionMLP(nn.Module):
    """SemCKD: a sample's row of the batch Gram matrix -> an L2-normalised embedding."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(batch_size, 256), nn.LeakyReLU(), nn.Linear(256, 128), nn.LeakyReLU())

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        flat = f.flatten(1).float()
        return F.normalize(self.net(flat @ flat.T), dim=1)


class Distiller(nn.Module):
    """A student with its projectors (and SimKD's frozen teacher tail); `forward` gives the deployable logits."""

    def __init__(self, student: nn.Sequential, method: str, student_layers: list[int], teacher_layers: list[int],
                 student_shapes: list[tuple], teacher_shapes: list[tuple], weights: LossWeights = LossWeights(),
                 teacher_tail: list[nn.Module] | None = None, batch_size: int = 128):
        super().__init__()
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        self.method, self.spec, self.weights, self.batch_size = method, METHODS[method], weights, batch_size
        self.teacher_shapes = [tuple(t) for t in teacher_shapes]
        self.student = student
        self.view = LayerChain(student)
        self.student_layers = sorted(self.view.index(k) for k in student_layers)
        self.teacher_layers = list(teacher_layers)
        features = self.spec.features
        if features in ("one2one", "sp", "simkd") and len(self.student_layers) != len(self.teacher_layers):
            raise InputError(f"{method} pairs layers one-to-one: {len(self.student_layers)} student layers "
                             f"vs {len(self.teacher_layers)} teacher layers")
        n_s, n_t = len(self.student_layers), len(self.teacher_layers)
        self.pairs = ([(i, j) for i in range(n_s) for j in range(n_t)] if features in ("all", "semckd")
                      else [(i, i) for i in range(n_s)] if features else [])
        s_shapes = [tuple(canonical(torch.zeros(1, *s)).shape[1:]) for s in student_shapes]
        t_shapes = [tuple(canonical(torch.zeros(1, *t)).shape[1:]) for t in teacher_shapes]
        self.plans = [alignment(s_shapes[i], t_shapes[j]) for i, j in self.pairs]
        make = PROJECTORS[self.spec.projector]
        self.projectors = nn.ModuleList(
            [make(s_shapes[i][0], t_shapes[j][0], len(s_shapes[i]) - 1) for i, j in self.pairs]
            if features and features != "sp" else [])
        self.queries = nn.ModuleList([AttentionMLP(batch_size) for _ in range(n_s)]) if features == "semckd" else None
        self.keys = nn.ModuleList([AttentionMLP(batch_size) for _ in range(n_t)]) if features == "semckd" else None
        self.tail = None
        if features == "simkd":
            if teacher_tail is None:
                raise InputError("simkd needs the teacher's layers after its deepest distilled layer")
            self.tail = nn.ModuleList(teacher_tail).requires_grad_(False)
            # the teacher's tail makes the logits: the student's own head would get no gradient (which
            # DistributedDataParallel refuses) and is left out of the optimiser
            for module in self.view.modules[self.view.ends[self.student_layers[-1]] + 1:]:
                module.requires_grad_(False)

    def get_classifier(self) -> nn.Module:
        """The student's own classifier: the optimiser's head group (projectors train with the backbone)."""
        return nn.ModuleList(classifier_modules(self.student))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.tail is not None:
            self.tail.eval()  # the borrowed teacher tail stays frozen in eval mode
        return self

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, teacher_feats=None, teacher_logits=None):
        """Logits for `x`; with labels (training, also through DistributedDataParallel) `losses(...)` instead."""
        if y is not None:
            return self.losses(x, y, teacher_feats, teacher_logits)
        return self.student(x) if self.tail is None else self.features_and_logits(x)[1]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The deepest distilled layer's output and the logits, from one forward pass."""
        z = self.view.collect(x, [self.student_layers[-1]])[0]
        if self.tail is None:
            return z, self.view.head(z, self.student_layers[-1])
        return z, self._run_tail(self._project(len(self.pairs) - 1, canonical(z)))  # SimKD: the teacher's tail

    def _run_tail(self, z: torch.Tensor) -> torch.Tensor:
        """SimKD: the teacher's tail on the projected deepest student feature."""
        if z.dim() == 3:  # tokens back to (B, L, D) for a ViT tail
            z = z.transpose(1, 2)
        for module in self.tail:
            z = module(z)
        return z

    # --- training ------------------------------------------------------------------------------------
    def _project(self, p: int, s: torch.Tensor) -> torch.Tensor:
        side, size = self.plans[p]
        if side == "student":
            s = pool_to(s, size)
        return self.projectors[p](s)

    def _target(self, p: int, t: torch.Tensor) -> torch.Tensor:
        side, size = self.plans[p]
        return pool_to(t, size) if side == "teacher" else t

    def losses(self, x: torch.Tensor, y: torch.Tensor, teacher_feats: list[torch.Tensor] | None,
               teacher_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss, logits and each weighted term for one batch."""
        feats = self.view.collect(x, self.student_layers)
        student = [canonical(f) for f in feats]
        projected = [self._project(p, student[i]) for p, (i, _) in enumerate(self.pairs)] if self.projectors else []
        if self.tail is not None:  # (its projector once a step: BatchNorm statistics updated once)
            logits = self._run_tail(projected[-1])
        else:
            z = feats[-1]
            logits = self.view.head(z.detach() if self.spec.detach_head else z, self.student_layers[-1])
        w = self.weights
        terms = {"ce": w.ce * F.cross_entropy(logits.float(), y)}
        if self.spec.kl:
            terms["kl"] = w.kl * kd_kl(logits, teacher_logits, w.tau, self.spec.standardize_logits)
        if self.spec.features:
            teacher = [canonical(t) for t in teacher_feats]
            terms.update(self._feature_terms(student, projected, teacher))
        total = _total(list(terms.values()))
        return total, logits, terms

    def _feature_terms(self, student: list[torch.Tensor], projected: list[torch.Tensor],
                       teacher: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        w, kind = self.weights, self.spec.features
        if kind == "sp":
            sp = torch.stack([F.mse_loss(similarity(student[i]), similarity(teacher[j])) for i, j in self.pairs])
            return {"sp": w.feature * sp.mean()}
        targets = [self._target(p, teacher[j]).float() for p, (_, j) in enumerate(self.pairs)]
        if kind == "semckd":
            per_sample = torch.stack([((s.float() - t) ** 2).flatten(1).mean(1) for s, t in zip(projected, targets)])
            queries = torch.stack([q(f) for q, f in zip(self.queries, student)], 1)  # (B, S, E)
            keys = torch.stack([k(f) for k, f in zip(self.keys, teacher)], 1)        # (B, T, E)
            attn = torch.softmax(queries @ keys.transpose(1, 2), dim=2)             # (B, S, T)
            weighted = attn.flatten(1).T * per_sample                                # (S*T, B), pairs row-major
            loss = weighted.sum(0).mean() / len(student)
        else:
            mse = [F.mse_loss(s.float(), t) for s, t in zip(projected, targets)]
            loss = _total(mse) / len(mse)  # all: each student layer's mean over teacher layers, then their mean
        terms = {"feature": w.feature * loss}
        if w.relation:
            rel = torch.stack([F.mse_loss(similarity(s), similarity(t)) for s, t in zip(projected, targets)])
            terms["relation"] = w.relation * rel.mean()
        return terms

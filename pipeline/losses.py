"""Loss terms of the distillation methods (METHOD.md §2, §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import InputError


def zscore(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample logit standardisation (Sun et al.): (z - mean) / (unbiased std + 1e-6)."""
    return (logits - logits.mean(1, keepdim=True)) / (logits.std(1, keepdim=True) + 1e-6)


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, tau: float, standardize: bool = False) -> torch.Tensor:
    """KL(softmax(t/tau) || softmax(s/tau)), summed over classes, averaged over the batch (weight tau^2 is the caller's)."""
    student, teacher = student.float(), teacher.float()
    if standardize:
        student, teacher = zscore(student), zscore(teacher)
    log_p_s = F.log_softmax(student / tau, dim=1)
    log_p_t = F.log_softmax(teacher / tau, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(1).mean()


def canonical(f: torch.Tensor) -> torch.Tensor:
    """Layout for projection: maps stay (B,C,H,W), vectors become (B,C,1,1), tokens (B,L,D) become (B,D,L)."""
    if f.dim() == 2:
        return f[:, :, None, None]
    if f.dim() == 3:
        return f.transpose(1, 2)
    return f


def pool_to(f: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(f.shape[2:]) == tuple(size):
        return f
    return F.adaptive_avg_pool1d(f, size) if f.dim() == 3 else F.adaptive_avg_pool2d(f, size)


def alignment(student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """Which side is average-pooled, and to what size: the larger map always goes down to the smaller one.

    Shapes are canonical per-sample shapes (C, H, W) or (D, L).
    """
    s, t = tuple(student_shape[1:]), tuple(teacher_shape[1:])
    if len(s) != len(t):
        raise InputError(f"cannot pair a student layer of shape {student_shape} with a teacher layer of shape "
                         f"{teacher_shape}: token and map features do not mix")
    if all(a <= b for a, b in zip(s, t)):
        return "teacher", s
    if all(a >= b for a, b in zip(s, t)):
        return "student", t
    raise InputError(f"student map {s} is neither inside nor around teacher map {t}: unsupported pairing")


def similarity(f: torch.Tensor) -> torch.Tensor:
    """B x B cosine similarities of per-sample flattened features (L2-normalised with eps 1e-4), in float32 even
    under autocast (which would run the product in bf16)."""
    with torch.autocast(f.device.type, enabled=False):
        f = F.normalize(f.flatten(1).float(), dim=1, eps=1e-4)
        return f @ f.T

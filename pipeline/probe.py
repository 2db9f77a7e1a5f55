"""Linear probe: a logistic-regression head fitted on the frozen student's pooled deepest distilled features.

The L2 penalty is chosen on a held-out, class-stratified part of the training split, never on the test set.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from pipeline.data import DeviceData
from pipeline.distill import Distiller
from pipeline.errors import InputError, TrainingError
from pipeline.sources import stratified_mask
from pipeline.train import autocast

FORMAT = "kd-probe/1"


def pool(f: torch.Tensor) -> torch.Tensor:
    """(B,C,H,W) -> spatial mean; (B,L,D) tokens -> token mean; (B,C) unchanged."""
    if f.dim() == 4:
        return f.mean((2, 3))
    if f.dim() == 3:
        return f.mean(1)
    return f


@torch.no_grad()
def pooled_features(distiller: Distiller, data: DeviceData, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's inputs (the pooled deepest distilled layer) and the student's own logits, in one pass."""
    distiller.eval()
    feats, logits = [], []
    for _, x, _ in data.batches(batch_size):
        with autocast(data.device):
            z, out = distiller.features_and_logits(x)
        feats.append(pool(z).float())
        logits.append(out.float())
    return torch.cat(feats), torch.cat(logits)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float,
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + weight_decay/2 * ||W||^2 (bias unpenalised) with L-BFGS in float64."""
    x = x.double()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    if not (torch.isfinite(w).all() and torch.isfinite(b).all()):
        raise TrainingError(f"the probe's fit diverged (weight decay {weight_decay:g})")
    return w.detach(), b.detach()


@dataclass
class Probe:
    weight: torch.Tensor  # (D, C)
    bias: torch.Tensor
    mean: torch.Tensor    # feature standardisation, from the training split
    std: torch.Tensor
    weight_decay: float

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        return ((feats.double() - self.mean) / self.std) @ self.weight + self.bias


def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.double()
    return x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).double().mean().item()


def fit_probe(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decays: list[float], holdout: float,
              seed: int, max_iter: int) -> tuple[Probe, list[dict]]:
    """Pick the penalty with the best held-out accuracy (ties: the stronger penalty), then refit on all of x."""
    held = torch.from_numpy(stratified_mask(y.cpu().numpy(), holdout, seed)).to(x.device)
    mean, std = _standardizer(x[~held])
    fit_x, held_x = (x[~held].double() - mean) / std, (x[held].double() - mean) / std
    trials = []
    for wd in weight_decays:
        w, b = fit_logistic(fit_x, y[~held], num_classes, wd, max_iter)
        trials.append({"weight_decay": wd, "holdout_acc": accuracy(held_x @ w + b, y[held])})
    best = max(trials, key=lambda t: (t["holdout_acc"], t["weight_decay"]))["weight_decay"]
    mean, std = _standardizer(x)
    w, b = fit_logistic((x.double() - mean) / std, y, num_classes, best, max_iter)
    return Probe(w, b, mean, std, best), trials


def probe_student(distiller: Distiller, data, device: torch.device, weight_decays: list[float], holdout: float,
                  seed: int, max_iter: int, batch_size: int = 1024) -> tuple[Probe, dict]:
    """Fit the probe (on the CPU) on the training split's features (computed on `device`); report its train/test
    accuracy beside the student's own head, and the seconds its L-BFGS fits took (`fit_seconds`: every penalty
    tried, then the refit)."""
    from pipeline.teacher import device_splits
    from pipeline.train import prepare_model

    distiller = prepare_model(distiller, device)
    train, test = device_splits(data, device)
    (train_x, _), (test_x, head_logits) = (pooled_features(distiller, split, batch_size) for split in (train, test))
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise InputError("the student's features are not finite (NaN or inf in its weights): retrain it")
    # the fits run on the CPU: L-BFGS over a few MB of float64 is latency-bound, each line-search step waiting on
    # the host, and on a GPU shared by concurrent runs those waits queue behind the others' kernels (5-78 s per
    # run's fits with 8 runs on an H100; about 1-4 s on two CPU threads for 6,000 images)
    train_x, test_x, head_logits = train_x.cpu(), test_x.cpu(), head_logits.cpu()
    train_y, test_y = train.labels.cpu(), test.labels.cpu()
    start = time.perf_counter()
    probe, trials = fit_probe(train_x, train_y, data.num_classes, weight_decays, holdout, seed, max_iter)
    fit_seconds = time.perf_counter() - start
    metrics = {"probe_test_acc": accuracy(probe.logits(test_x), test_y),
               "probe_train_acc": accuracy(probe.logits(train_x), train_y),
               "head_test_acc": accuracy(head_logits, test_y),
               "weight_decay": probe.weight_decay, "trials": trials,
               "layer": distiller.student_layers[-1], "feature_dims": train_x.shape[1], "train_images": len(train_x),
               "fit_seconds": fit_seconds}
    return probe, metrics


def save_probe(path, probe: Probe, layer: int) -> None:
    from pipeline.checkpoint import save_checkpoint

    save_checkpoint(path, FORMAT, **asdict(probe), layer=layer)


def load_probe(probe_dir, student_manifest: dict) -> Probe:
    """A saved probe, refused unless it was fitted on the student of `student_manifest`."""
    from pathlib import Path

    from pipeline.checkpoint import load_checkpoint
    from pipeline.io import manifest_id, read_verified

    read_verified(probe_dir, "probe", {"student": manifest_id(student_manifest)})
    ckpt = load_checkpoint(Path(probe_dir) / "probe.pt", FORMAT, "probe")
    return Probe(**{f.name: ckpt[f.name] for f in fields(Probe)})

"""Test-set evaluation of classifiers and honest aggregation over seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import InputError


def classification_report(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1, top-5, per-class accuracy and the confusion matrix (rows: true class, columns: predicted)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    top = logits.topk(min(5, num_classes), dim=1).indices
    pred = top[:, 0]
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = (confusion.diagonal().double() / confusion.sum(1).clamp_min(1)).tolist()
    return {"top1": (pred == labels).double().mean().item(),
            "top5": (top == labels[:, None]).any(1).double().mean().item(),
            "per_class": per_class, "confusion": confusion.tolist()}


def confusion_rows(truth, predicted, classes: list[str]) -> list[dict]:
    """One (actual, predicted) row per test sample: the table `dvc plots` draws as a confusion matrix."""
    return [{"actual": classes[a], "predicted": classes[p]} for a, p in zip(list(truth), list(predicted))]


def learning_curve_rows(curve: list[float]) -> list[dict]:
    """One (epoch, test_acc) row per epoch of a run: a line of the `dvc plots` learning-curve plot."""
    return [{"epoch": i + 1, "test_acc": acc} for i, acc in enumerate(curve)]


def per_class_rows(classes: list[str], teacher: dict, runs: list[dict]) -> list[dict]:
    return [{"class": c, "teacher": teacher["per_class"][i], **{r["run"]: r["per_class"][i] for r in runs}}
            for i, c in enumerate(classes)]


def headline_metrics(teacher: dict, summary: dict) -> dict:
    """The small metrics file `dvc metrics show` and `dvc exp show` read: means over seeds."""
    return {"teacher": {"top1": teacher["top1"], "top5": teacher["top5"]},
            **{m: {k: v["mean"] for k, v in s.items() if isinstance(v, dict)} for m, s in summary.items()}}


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one run) of a list of numbers."""
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
    return {"mean": float(arr.mean()), "std": std, "n": len(arr)}


def aggregate(runs: list[dict]) -> dict:
    """Per method: last-epoch test top-1 (the headline) and best-epoch top-1 (selected on the test set) apart."""
    by_method: dict[str, list[dict]] = {}
    for run in runs:
        by_method.setdefault(run["method"], []).append(run)
    out = {}
    for method, group in sorted(by_method.items()):
        out[method] = {"last_epoch_top1": mean_std([r["top1"] for r in group]),
                       "best_epoch_top1": mean_std([r["best_epoch_top1"] for r in group]),
                       "top5": mean_std([r["top5"] for r in group]),
                       "seeds": sorted(r["seed"] for r in group)}
        probes = [r["probe_top1"] for r in group if r.get("probe_top1") is not None]
        if probes:
            out[method]["probe_top1"] = mean_std(probes)
    return out


def _pm(stats: dict) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}" if stats["n"] > 1 else f"{100 * stats['mean']:.2f}"


def markdown_summary(teacher: dict, summary: dict) -> str:
    lines = ["# Evaluation summary", "",
             "Headline: **last-epoch** test top-1 (mean ± sample std over seeds). Best-epoch top-1 picks the epoch "
             "on the test set, so it is shown apart and is not a fair estimate.", "",
             f"Teacher top-1: {100 * teacher['top1']:.2f} %, top-5: {100 * teacher['top5']:.2f} %", "",
             "| method | seeds | last-epoch top-1 (%) | best-epoch top-1 (%) | top-5 (%) | linear probe top-1 (%) |",
             "|---|---|---|---|---|---|"]
    for method, s in summary.items():
        probe = _pm(s["probe_top1"]) if "probe_top1" in s else "–"
        lines.append(f"| {method} | {len(s['seeds'])} | {_pm(s['last_epoch_top1'])} | "
                     f"{_pm(s['best_epoch_top1'])} | {_pm(s['top5'])} | {probe} |")
    return "\n".join(lines) + "\n"


BATCH = 1024


def evaluate_pipeline(data, teacher_dir, runs_dir, run_names: list[str],
                      device: torch.device) -> tuple[dict, list[dict], dict[str, torch.Tensor]]:
    """Teacher report, one report per student run (head and probe) and the test predictions of each model.

    `run_names` ("<method>-s<seed>") name the runs to evaluate, so runs left in `runs_dir` by an earlier
    methods x seeds matrix never leak into the report.
    """
    from pipeline.teacher import device_splits, load_teacher
    from pipeline.train import predict_logits, prepare_model

    _, test = device_splits(data, device)
    teacher, _, teacher_id = load_teacher(teacher_dir, data)
    logits = predict_logits(prepare_model(teacher, device), test, BATCH)
    predictions = {"teacher": logits.argmax(1).cpu()}
    runs = []
    for name in run_names:
        run, predictions[name] = _evaluate_run(data, test, Path(runs_dir), name, teacher_id, device)
        runs.append(run)
    return classification_report(logits, test.labels, data.num_classes), runs, predictions


def _evaluate_run(data, test, runs_dir: Path, name: str, teacher_id: str,
                  device: torch.device) -> tuple[dict, torch.Tensor]:
    """The report of run `name` (its head's, its learning curve, its probe's top-1) and its head's predictions;
    refused if its student learned from another teacher than the one reported beside it (`teacher_id`)."""
    from pipeline.io import read_manifest
    from pipeline.probe import load_probe, pooled_features
    from pipeline.student import load_student_dir
    from pipeline.train import prepare_model

    run_dir = runs_dir / f"student-{name}"
    manifest = read_manifest(run_dir, "student")
    method, seed = manifest["params"]["method"], manifest["params"]["seed"]
    if name != f"{method}-s{seed}":  # a copied or renamed run would be reported as another
        raise InputError(f"{run_dir} holds the student of method {method}, seed {seed}")
    distiller, _, _ = load_student_dir(run_dir, data, teacher_id)  # not a student of another teacher
    feats, logits = pooled_features(prepare_model(distiller, device), test, BATCH)
    curve = [r["test_acc"] for r in manifest["history"]]
    run = {"run": name, "method": method, "seed": seed, **classification_report(logits, test.labels, data.num_classes),
           "best_epoch_top1": max(curve), "epochs": len(curve), "test_acc_by_epoch": curve, "probe_top1": None}
    probe_dir = runs_dir / f"probe-{name}"
    if (probe_dir / "probe.pt").is_file():
        probe = load_probe(probe_dir, manifest)
        run["probe_top1"] = classification_report(probe.logits(feats.cpu()), test.labels.cpu(),
                                                  data.num_classes)["top1"]
    return run, logits.argmax(1).cpu()

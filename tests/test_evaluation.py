"""Metrics and seed aggregation of the evaluate stage."""

import numpy as np
import pytest
import torch

from pipeline.evaluation import aggregate, classification_report, headline_metrics, markdown_summary


def test_report_top1_top5_per_class_and_confusion():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0], [0, 5.0, 4, 0, 0, 0], [0, 4, 5.0, 0, 0, 0], [1, 2, 3, 4, 5, 6.0]])
    labels = torch.tensor([0, 2, 2, 0])
    report = classification_report(logits, labels, 6)
    assert report["top1"] == 0.5  # samples 0 and 2
    assert report["top5"] == 0.75  # sample 3's true class 0 is its 6th choice
    assert report["confusion"][2] == [0, 1, 1, 0, 0, 0] and report["confusion"][0][5] == 1
    assert report["per_class"][:3] == [0.5, 0.0, 0.5]


def _run(method, seed, top1, best):
    return {"method": method, "seed": seed, "top1": top1, "top5": 0.99, "best_epoch_top1": best,
            "probe_top1": 0.9 if method == "ours" else None}


def test_aggregate_keeps_last_and_best_epoch_apart():
    runs = [_run("ours", 0, 0.80, 0.82), _run("ours", 1, 0.84, 0.85), _run("ce", 0, 0.83, 0.83)]
    summary = aggregate(runs)
    ours = summary["ours"]
    assert ours["last_epoch_top1"]["mean"] == pytest.approx(0.82)
    assert ours["last_epoch_top1"]["std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert ours["best_epoch_top1"]["mean"] == pytest.approx(0.835)
    assert ours["seeds"] == [0, 1] and ours["probe_top1"]["mean"] == pytest.approx(0.9)
    assert summary["ce"]["last_epoch_top1"] == {"mean": 0.83, "std": 0.0, "n": 1}
    assert "probe_top1" not in summary["ce"]
    teacher = {"top1": 0.9, "top5": 1.0}
    text = markdown_summary(teacher, summary)
    assert "| ours | 2 | 82.00 ± 2.83 | 83.50 ± 2.12 |" in text and "| ce | 1 | 83.00 | 83.00 |" in text
    assert headline_metrics(teacher, summary)["ours"]["last_epoch_top1"] == pytest.approx(0.82)

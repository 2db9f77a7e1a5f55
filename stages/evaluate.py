"""Stage `evaluate`: test-set metrics of the teacher and every student run, aggregated over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, TeacherOpt, guarded, load


@guarded
def evaluate(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    teacher_dir: Path = TeacherOpt,
    runs: Path = typer.Option(Path("runs"), help="folder of student-<method>-s<seed> and probe-... outputs"),
    metrics: Path = typer.Option(Path("metrics/evaluate.json"), help="metrics JSON (dvc metrics show)"),
    report: Path = typer.Option(Path("reports/summary.md"), help="Markdown summary table"),
    plots: Path = typer.Option(Path("plots"), help="confusion-matrix, per-class and per-epoch test-accuracy CSVs "
                                                   "(dvc plots show)"),
) -> None:
    """Teacher and the params' methods x seeds runs: top-1/top-5, per-class, confusion; mean ± std over seeds."""
    cfg = load(params, overrides)
    from pipeline.data import load_prepared
    from pipeline.evaluation import (aggregate, confusion_rows, evaluate_pipeline, headline_metrics,
                                     learning_curve_rows, markdown_summary, per_class_rows)
    from pipeline.io import check_outputs, write_csv, write_json, write_text
    from pipeline.train import pick_device

    names = [f"{method}-s{seed}" for method in cfg.methods for seed in cfg.seeds]
    details = metrics.with_name(metrics.stem + "-details.json")
    confusion = {name: plots / "confusion" / f"{name}.csv" for name in ("teacher", *names)}
    curves = {name: plots / "test_acc" / f"{name}.csv" for name in names}
    check_outputs(metrics, details, report, plots / "per_class.csv", *confusion.values(), *curves.values(),
                  scratch=(plots / "confusion", plots / "test_acc"), stage="evaluate")

    prepared = load_prepared(data)
    device = pick_device(cfg.evaluate.device)
    teacher, runs_found, predictions = evaluate_pipeline(prepared, teacher_dir, runs, names, device)
    summary = aggregate(runs_found)
    write_json(metrics, headline_metrics(teacher, summary))
    write_json(details, {"teacher": teacher, "methods": summary, "runs": runs_found})
    write_text(report, markdown_summary(teacher, summary))
    classes = prepared.meta["classes"]
    for name, predicted in predictions.items():
        write_csv(confusion[name], confusion_rows(prepared.test_labels, predicted.tolist(), classes),
                  ["actual", "predicted"])
    for run in runs_found:
        write_csv(curves[run["run"]], learning_curve_rows(run["test_acc_by_epoch"]), ["epoch", "test_acc"])
    write_csv(plots / "per_class.csv", per_class_rows(classes, teacher, runs_found),
              ["class", "teacher", *[r["run"] for r in runs_found]])
    headline = ", ".join(f"{m} {s['last_epoch_top1']['mean']:.2%}" for m, s in summary.items())
    typer.echo(f"evaluated teacher {teacher['top1']:.2%}, {headline} (last epoch, mean over seeds) -> {report}")

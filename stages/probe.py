"""Stage `probe`: a linear classifier on the frozen distilled backbone, penalty chosen on held-out training data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, guarded, load


@guarded
def probe(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    student_dir: Path = typer.Option(Path("models/student"), "--student", help="output folder of `student`"),
    out: Path = typer.Option(Path("models/probe"), help="output folder: probe.pt and manifest.json"),
    metrics: Path = typer.Option(Path("metrics/probe.json"), help="probe metrics JSON"),
) -> None:
    """Fit a logistic-regression probe on the student's pooled deepest distilled layer (params section `probe`)."""
    cfg = load(params, overrides)
    p = cfg.probe
    from pipeline.data import load_prepared
    from pipeline.io import atomic_dir, check_outputs, write_json, write_manifest
    from pipeline.probe import probe_student, save_probe
    from pipeline.student import load_student_dir, training_data
    from pipeline.train import pick_device

    check_outputs(metrics, folders=(out,), stage="probe")

    prepared = load_prepared(data)
    distiller, _, student_id = load_student_dir(student_dir, prepared)
    fitted, summary = probe_student(distiller, training_data(student_dir, prepared), pick_device(p.device),
                                    p.weight_decays, p.holdout, cfg.seed, p.max_iter)
    with atomic_dir(out) as tmp:
        save_probe(tmp / "probe.pt", fitted, summary["layer"])
        write_manifest(tmp, "probe", cfg.recorded_for("probe"),
                       inputs={"data": prepared.data_id, "student": student_id})
    write_json(metrics, summary)
    typer.echo(f"probe (weight decay {fitted.weight_decay:g}): test acc {summary['probe_test_acc']:.4f}, "
               f"student head {summary['head_test_acc']:.4f} -> {out / 'probe.pt'}")

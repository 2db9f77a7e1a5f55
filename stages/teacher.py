"""Stage `teacher`: train the teacher (or adopt a given checkpoint) and record its metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, guarded, load, training_callbacks


@guarded
def teacher(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    out: Path = typer.Option(Path("models/teacher"), help="output folder: model.pt and manifest.json"),
    metrics: Path = typer.Option(Path("metrics/teacher.json"), help="final metrics JSON"),
    live_dir: Path = typer.Option(Path("dvclive/teacher"), help="dvclive folder for per-epoch curves"),
    resume_dir: Path = typer.Option(Path(".kd-resume"), help="per-epoch resume checkpoints (kept until success)"),
) -> None:
    """Train the teacher on the prepared data (params section `teacher`), resumable after a kill."""
    cfg = load(params, overrides)
    p = cfg.teacher
    from pipeline import distributed
    from pipeline.checkpoint import save_model
    from pipeline.data import load_prepared
    from pipeline.io import atomic_dir, check_outputs, remove_when_committed, write_json, write_manifest
    from pipeline.teacher import adopt_teacher, train_teacher, training_key

    check_outputs(metrics, folders=(out, live_dir), scratch=(resume_dir,), stage="teacher")

    distributed.init_from_env()
    prepared = load_prepared(data)
    section = cfg.recorded_for("teacher")
    if p.checkpoint:
        model, spec, summary = adopt_teacher(p.checkpoint, prepared, p)
        history = []
    else:
        key = training_key(section, prepared.data_id)
        resume = resume_dir / f"teacher-{key}.pt"
        with training_callbacks("teacher", p.train.epochs, live_dir) as callbacks:
            model, spec, summary, history = train_teacher(prepared, p, cfg.seed, resume, key, **callbacks)
    if not distributed.is_main():  # rank 0 alone writes (an adopted teacher too) and drops the resume checkpoint
        return
    with atomic_dir(out) as tmp:
        save_model(tmp / "model.pt", model, spec, **prepared.checkpoint_info())
        write_manifest(tmp, "teacher", section, inputs={"data": prepared.data_id}, extra={"history": history})
    write_json(metrics, summary)
    if not p.checkpoint:
        remove_when_committed(resume)
    typer.echo(f"teacher {spec.arch}: test acc {summary['test_acc']:.4f} -> {out / 'model.pt'}")

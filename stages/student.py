"""Stage `student`: train the student with a distillation method (params section `student`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, TeacherOpt, guarded, load, training_callbacks


@guarded
def student(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    teacher_dir: Path = TeacherOpt,
    scores: Path = typer.Option(Path("scores"), help="output folder of `score` (selected layers)"),
    cache_dir: Path = typer.Option(Path("cache/teacher"), "--cache", help="output folder of `cache`"),
    out: Path = typer.Option(Path("models/student"), help="output folder: model.pt and manifest.json"),
    metrics: Path = typer.Option(Path("metrics/student.json"), help="final metrics JSON"),
    live_dir: Path = typer.Option(Path("dvclive/student"), help="dvclive folder for per-epoch curves"),
    resume_dir: Path = typer.Option(Path(".kd-resume"), help="per-epoch resume checkpoints (kept until success)"),
) -> None:
    """Train the student; `ours` trains its backbone with feature losses only (logit-free)."""
    cfg = load(params, overrides)
    p = cfg.student
    from pipeline import distributed
    from pipeline.data import load_prepared
    from pipeline.io import atomic_dir, check_outputs, remove_when_committed, write_json, write_manifest
    from pipeline.student import save_student, teacher_inputs, train_student
    from pipeline.teacher import load_teacher, training_key

    check_outputs(metrics, folders=(out, live_dir), scratch=(resume_dir,), stage="student")

    distributed.init_from_env()
    prepared = load_prepared(data)
    teacher, teacher_spec, teacher_id = load_teacher(teacher_dir, prepared)
    train_data = prepared.train_subset(p.train_subset)
    selected, cache = teacher_inputs(p, teacher_spec.arch, teacher_id, train_data, scores, cache_dir)
    section = cfg.recorded_for("student")
    key = training_key(section, prepared.data_id, teacher=teacher_id)
    resume = resume_dir / f"student-{key}.pt"
    with training_callbacks(f"student {p.method}", p.train.epochs, live_dir) as callbacks:
        distiller, summary, history = train_student(train_data, p, cfg.seed, teacher, teacher_spec, selected,
                                                    cache, resume, key, **callbacks)
    if not distributed.is_main():
        return
    with atomic_dir(out) as tmp:
        save_student(tmp / "model.pt", distiller, teacher_spec, **prepared.checkpoint_info())
        write_manifest(tmp, "student", section, inputs={"data": prepared.data_id, "teacher": teacher_id},
                       extra={"history": history})
    summary = {"method": p.method, "teacher_layers": distiller.teacher_layers,
               "student_layers": distiller.student_layers, "train_images": len(train_data.train_labels), **summary}
    write_json(metrics, summary)
    remove_when_committed(resume)
    typer.echo(f"student {p.model.arch} ({p.method}, teacher layers {distiller.teacher_layers}): "
               f"test acc {summary['test_acc']:.4f} (best {summary['best_test_acc']:.4f}) -> {out / 'model.pt'}")

"""Stage `cache`: the teacher's logits, and float16 features of the layers the params' methods distil from, for
the images the students learn from (no features with `student.teacher_features: device`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, TaskProgress, TeacherOpt, guarded, load


@guarded
def cache(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    teacher_dir: Path = TeacherOpt,
    scores: Path = typer.Option(Path("scores"), help="output folder of `score` (selection.json)"),
    out: Path = typer.Option(Path("cache/teacher"),
                             help="output folder: layer_<k>.npy, logits.npy and manifest.json"),
) -> None:
    """Cache the teacher layers that the params' `methods` distil from, and the logits, for every training image
    the students learn from (`student.train_subset`)."""
    cfg = load(params, overrides)
    p = cfg.cache
    from pipeline.cache import DTYPE, write_cache
    from pipeline.data import load_prepared
    from pipeline.io import atomic_dir, check_outputs, write_manifest
    from pipeline.selection import load_selection
    from pipeline.student import layers_to_cache
    from pipeline.teacher import load_teacher
    from pipeline.train import pick_device, prepare_model

    check_outputs(folders=(out,), stage="cache")

    prepared = load_prepared(data)
    model, spec, teacher_id = load_teacher(teacher_dir, prepared)
    selected = load_selection(scores, teacher_id)
    layers = layers_to_cache(cfg.methods, cfg.student, spec.arch, selected)
    device = pick_device(p.device)
    model = prepare_model(model, device)
    prepared = prepared.train_subset(cfg.student.train_subset)
    with TaskProgress("cache", len(prepared.train_labels)) as progress, atomic_dir(out) as tmp:
        files, shapes, stats = write_cache(model, prepared, layers, device, p.batch_size, tmp, progress.advance)
        write_manifest(tmp, "cache", cfg.recorded_for("cache"),
                       inputs={"data": prepared.data_id, "teacher": teacher_id}, files=files,
                       extra={"layers": layers, "shapes": shapes, "channel_stats": stats, "dtype": DTYPE.__name__,
                              "num_samples": len(prepared.train_labels)})
    typer.echo(f"cached teacher layers {layers} for {len(prepared.train_labels)} images -> {out}")

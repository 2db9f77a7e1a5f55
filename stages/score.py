"""Stage `score`: knowledge quality (S, I, E, Q) of every teacher layer and the automatic layer selection."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, TaskProgress, TeacherOpt, guarded, load

@guarded
def score(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    teacher_dir: Path = TeacherOpt,
    out: Path = typer.Option(Path("scores"), help="output folder: layers.json/.csv, selection.json, manifest"),
) -> None:
    """Score every teacher layer on the training split (params section `score`) and select the layers to distil."""
    cfg = load(params, overrides)
    p = cfg.score
    import torch

    from pipeline.data import load_prepared
    from pipeline.io import atomic_dir, check_outputs, write_manifest
    from pipeline.layers import layer_view
    from pipeline.scoring import score_layers
    from pipeline.selection import check_choice, choose_layers, write_scores
    from pipeline.teacher import load_teacher
    from pipeline.train import pick_device, prepare_model

    check_outputs(folders=(out,), stage="score")

    prepared = load_prepared(data)
    model, spec, teacher_id = load_teacher(teacher_dir, prepared)
    check_choice(len(layer_view(model)), p.k, p.layers)  # before spending time on scoring
    device = pick_device(p.device)
    model = prepare_model(model, device)
    with TaskProgress("score", len(layer_view(model)), unit="layers") as progress:
        def on_layer(row: dict) -> None:
            progress.advance()
            progress.note(f"layer {row['layer']:>2} {str(row['shape']):<16} S {row['S']:.4f}  I {row['I']:.4f}  "
                          f"E {row['E']:.4f}  Q {row['Q']:.4f}")

        rows = score_layers(model, prepared, device, p.mode, p.subset_a, p.subset_b_per_class, cfg.seed,
                            p.batch_size, getattr(torch, p.dtype), on_layer)
    layers, how = choose_layers(rows, p.criterion, p.k, p.layers)
    selection = {"layers": layers, "chosen_by": how, "criterion": p.criterion, "mode": p.mode,
                 "teacher_arch": spec.arch, "num_teacher_layers": len(rows)}
    with atomic_dir(out) as tmp:
        write_scores(tmp, rows, selection)
        write_manifest(tmp, "score", cfg.recorded_for("score"),
                       inputs={"data": prepared.data_id, "teacher": teacher_id})
    typer.echo(f"selected teacher layers {layers} ({how}) of {spec.arch} -> {out / 'selection.json'}")

"""Command `predict`: run the exported ONNX student with onnxruntime (not a DVC stage)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from stages.common import guarded

SKIPPED_EXIT = 3


@guarded
def predict(
    inputs: list[Path] = typer.Argument(..., help="image files, folders of images, or .npy uint8 arrays"),
    model: Path = typer.Option(Path("models/export/model.onnx"), help="ONNX file written by `kd export`"),
    out: Optional[Path] = typer.Option(None, help="write predictions here (.csv or .json); default: stdout CSV"),
    top_k: int = typer.Option(3, min=1, help="classes listed per input"),
    provider: str = typer.Option("auto", help="auto (CUDA when onnxruntime-gpu and a GPU are there), cuda or cpu"),
) -> None:
    """Predict classes with onnxruntime. Images of another size are padded or resized as the training images were;
    unreadable ones, and ones that cannot be, are named and skipped (exit code 3)."""
    from pipeline.errors import InputError
    from pipeline.io import check_outputs, write_text
    from pipeline.predict import format_rows, gather_inputs, model_info, pick_providers
    from pipeline.predict import predict as run_predict

    if out is not None:
        check_outputs(out)
        if out.suffix.lower() not in (".csv", ".json"):
            raise InputError(f"--out {out}: write .csv or .json")
    providers = pick_providers(provider)
    if not model.is_file():
        raise InputError(f"model file not found: {model}")
    info = model_info(model)
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise InputError(f"input not found: {', '.join(missing)}")
    found = gather_inputs(inputs, info["image_shape"], info["resize_mode"])
    if not found.images and not found.skipped:
        raise InputError(f"no images found in {', '.join(map(str, inputs))}")
    for name, reason in found.skipped:
        typer.echo(f"skipped {name}: {reason}", err=True)
    if not found.images:  # nothing to write: an earlier --out stays as it was
        typer.echo(f"0 predicted, {len(found.skipped)} skipped", err=True)
        raise typer.Exit(SKIPPED_EXIT)
    rows, used = run_predict(model, found, info["classes"], top_k, providers)
    typer.echo(f"{len(rows)} predicted, {len(found.skipped)} skipped, provider {used}", err=True)
    text = format_rows(rows, out.suffix.lower() if out else ".csv")
    if out:
        write_text(out, text)
    else:
        sys.stdout.write(text)
    if found.skipped:
        raise typer.Exit(SKIPPED_EXIT)


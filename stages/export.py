"""Stage `export`: the distilled student as one ONNX file, kept only if it passes the parity gate."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import DataOpt, ParamsOpt, SetOpt, guarded, load


@guarded
def export(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    data: Path = DataOpt,
    runs: Path = typer.Option(Path("runs"), help="folder of student-<run> and probe-<run> outputs"),
    out: Path = typer.Option(Path("models/export/model.onnx"), help="the ONNX file"),
    metrics: Path = typer.Option(Path("metrics/export.json"), help="parity figures JSON"),
) -> None:
    """Export student + head with preprocessing inside the graph; check with onnx and onnxruntime (params `export`)."""
    cfg = load(params, overrides)
    p = cfg.export
    from pipeline.data import load_prepared
    from pipeline.export import check_export_folder, export_student
    from pipeline.io import check_outputs, write_json, write_manifest

    check_outputs(out, metrics, out.parent / "manifest.json", stage="export")
    check_export_folder(out, metrics)

    prepared = load_prepared(data)
    run = p.run or f"{cfg.methods[0]}-s{cfg.seeds[0]}"
    probe_dir = runs / f"probe-{run}" if p.head == "probe" else None
    figures, made_from, digest = export_student(runs / f"student-{run}", probe_dir, prepared, out, p.opset,
                                        p.batch_sizes, p.small_batch_images, p.atol, p.min_agreement)
    write_json(metrics, figures)
    write_manifest(out.parent, "export", cfg.recorded_for("export"),
                   inputs={"data": prepared.data_id, **made_from}, files={out.name: digest})
    typer.echo(f"exported {run} ({p.head} head) -> {out}: max |logit diff| {figures['max_abs_diff']:.2e}, "
               f"top-1 agreement {figures['top1_agreement']:.4%}")

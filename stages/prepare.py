"""Stage `prepare`: read a dataset source, subset/resize it, write uint8 arrays, stats and a manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import ParamsOpt, SetOpt, guarded, load


@guarded
def prepare(
    params: Path = ParamsOpt,
    overrides: Optional[list[str]] = SetOpt,
    out: Path = typer.Option(Path("data/prepared"), help="output folder for arrays, meta.json, manifest.json"),
) -> None:
    """Prepare the dataset (params section `prepare`): arrays of uint8 NHWC images and int64 labels."""
    cfg = load(params, overrides)
    p = cfg.prepare
    from pipeline.io import atomic_dir, check_outputs, write_manifest
    from pipeline.prepare import save_prepared, transform
    from pipeline.sources import read_source

    check_outputs(folders=(out,), stage="prepare")

    raw = read_source(p.source, p.root, p.cache_dir, p.image_size, p.channels, p.test_fraction, cfg.seed,
                      p.resize_mode)
    data = transform(raw, p.image_size, p.resize_mode, p.channels, p.train_subset, p.test_subset, cfg.seed)
    with atomic_dir(out) as tmp:
        meta, files = save_prepared(data, tmp)
        write_manifest(tmp, "prepare", cfg.recorded_for("prepare"), inputs={"source": p.source}, files=files)
    h, w, c = meta["image_shape"]
    typer.echo(f"prepared {p.source}: {meta['num_train']} train / {meta['num_test']} test images, "
               f"{h}x{w}x{c}, {meta['num_classes']} classes -> {out}")

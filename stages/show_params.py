"""Command `params`: every params key with its value (the defaults, or a params file's) and meaning."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from stages.common import SetOpt, fail, guarded


@guarded
def params(
    section: Optional[str] = typer.Argument(None, help="a section or key prefix, e.g. student.train; default: all"),
    params_file: Optional[Path] = typer.Option(None, "--params", "-p",
                                               help="show this file's values (validated); default: the defaults"),
    overrides: Optional[list[str]] = SetOpt,
) -> None:
    """List the params keys, their values and what they do."""
    from pydantic import BaseModel

    from pipeline.config import load_params

    def rows(model: BaseModel, prefix: str):
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                yield from rows(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", value, field.description or ""

    listed = [r for r in rows(load_params(params_file, overrides or []), "")
              if section is None or r[0] == section or r[0].startswith(f"{section}.")]
    if not listed:
        fail(f"no params key or section {section!r}")
    for key, value, about in listed:
        typer.echo(f"{key:<34} {value!r:<22} {about}")

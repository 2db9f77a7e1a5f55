"""Command `params`: every params.yaml key with its default and meaning (from the pydantic schema)."""

from __future__ import annotations

from typing import Optional

import typer


def params(section: Optional[str] = typer.Argument(None, help="one section, e.g. student; default: all")) -> None:
    """List the params keys, their defaults and what they do."""
    from pydantic import BaseModel

    from pipeline.config import Params

    def rows(model: BaseModel, prefix: str):
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                yield from rows(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", value, field.description or ""

    listed = [r for r in rows(Params(), "") if section is None or r[0].split(".")[0] == section]
    if not listed:
        typer.echo(f"error: no params section {section!r}", err=True)
        raise typer.Exit(2)
    for key, default, about in listed:
        typer.echo(f"{key:<34} {default!r:<22} {about}")

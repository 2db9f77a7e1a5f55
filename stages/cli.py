"""The `kd` command: one sub-command per pipeline stage. Heavy libraries load inside each command."""

from __future__ import annotations

import typer

from stages.cache import cache
from stages.evaluate import evaluate
from stages.export import export
from stages.predict import predict
from stages.prepare import prepare
from stages.probe import probe
from stages.score import score
from stages.show_params import params
from stages.student import student
from stages.teacher import teacher

app = typer.Typer(
    name="kd",
    help="Logit-free feature knowledge distillation pipeline (Cooper et al., 2025), one command per DVC stage.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(prepare)
app.command()(teacher)
app.command()(score)
app.command()(cache)
app.command()(student)
app.command()(probe)
app.command()(evaluate)
app.command()(export)
app.command()(predict)
app.command()(params)


if __name__ == "__main__":
    app()

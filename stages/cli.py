"""The `kd` command: one sub-command per pipeline stage. Heavy libraries load inside each command."""

from __future__ import annotations

import signal
import sys
import threading

import typer
from typer.core import TyperGroup

from pipeline.errors import error_line

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

# click's exceptions, wherever this typer takes click from (recent ones carry their own copy)
clicks = sys.modules[typer.BadParameter.__module__]


class Stopped(SystemExit):
    """SIGTERM or Ctrl-C, raised where the command is: it unwinds as an error does (temporary outputs removed, the
    earlier ones kept), past every `except Exception`, to one line and exit code 128 + the signal."""


def _stop(signum, frame):
    raise Stopped(128 + signum)


class OneLineErrors(TyperGroup):
    """A mistyped option or a missing argument ends in one line and exit code 2, as every other bad input; SIGTERM
    (torchrun ending a failed job, a process manager stopping one) and Ctrl-C in one line too (`Stopped`)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        main_thread = threading.current_thread() is threading.main_thread()
        stops = (signal.SIGTERM, signal.SIGINT)
        previous = [signal.signal(s, _stop) for s in stops] if main_thread else []
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except clicks.NoArgsIsHelpError as err:
            err.show()
            code = err.exit_code
        except clicks.ClickException as err:
            hint = f" (see `{err.ctx.command_path} --help`)" if getattr(err, "ctx", None) else ""
            print(error_line(err.format_message() + hint), file=sys.stderr)
            code = err.exit_code
        except Stopped as stop:
            print(error_line(f"stopped by {signal.Signals(stop.code - 128).name}: the earlier outputs are kept"),
                  file=sys.stderr)
            code = stop.code
        finally:
            for s, handler in zip(stops, previous):
                signal.signal(s, handler)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
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

"""What every command shares: params options, one-line errors (exit code 2 for bad input, 1 for a failed run or
I/O), progress display."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import typer

from pipeline.errors import error_line

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params file (one section per stage)")
SetOpt = typer.Option(None, "--set", "-S", help="override a param, e.g. -S teacher.train.epochs=3 (repeatable)")
DataOpt = typer.Option(Path("data/prepared"), help="output folder of `prepare`")
TeacherOpt = typer.Option(Path("models/teacher"), "--teacher", help="output folder of `teacher`")


def fail(message: str, code: int = 2) -> None:
    typer.echo(error_line(message), err=True)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Put the stage's outputs in place together when it succeeds (`one_commit`), and turn the library's input and
    training errors, and the system's I/O errors, into one line on stderr and a non-zero exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.errors import InputError, RunError
        from pipeline.io import one_commit

        try:
            with one_commit():
                return fn(*args, **kwargs)
        except InputError as err:
            fail(str(err), 2)
        except (RunError, OSError) as err:  # OSError, e.g. a full disk: what was written is refused by checksum
            fail(str(err), 1)

    return wrapper


def load(params: Path, overrides: Optional[list[str]]):
    from pipeline.config import load_params

    return load_params(params, overrides or [])


class _Bars:
    """rich progress bars with a rate column on a terminal (stderr); plain lines when it is not one (logs, CI),
    with a progress line at least every `every_s` seconds of a long epoch or task."""

    every_s = 30.0

    def __init__(self):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.last_line = time.perf_counter()
        self.progress = None
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self.console)

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def note(self, line: str) -> None:
        self.last_line = time.perf_counter()
        if self.progress:
            self.progress.console.print(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def heartbeat(self, line: Callable[[], str]) -> None:
        if not self.progress and time.perf_counter() - self.last_line >= self.every_s:
            self.note(line())


class EpochProgress(_Bars):
    """Epochs and steps of a training run, with img/s."""

    def __init__(self, title: str, epochs: int):
        super().__init__()
        self.title, self.epochs = title, epochs
        if self.progress:
            self.epoch_task = self.progress.add_task(f"{title} epochs", total=epochs, rate="")
            self.step_task = self.progress.add_task("steps", total=1, rate="")

    def epoch_start(self, epoch: int, steps: int) -> None:
        self.images, self.started, self.epoch, self.steps, self.done = 0, time.perf_counter(), epoch, steps, 0
        if self.progress:
            self.progress.update(self.epoch_task, completed=epoch)
            self.progress.reset(self.step_task, total=steps, description=f"epoch {epoch + 1}", rate="")

    def step(self, images: int) -> None:
        self.images, self.done = self.images + images, self.done + 1
        rate = self.images / max(time.perf_counter() - self.started, 1e-9)
        if self.progress:
            self.progress.update(self.step_task, advance=1, rate=f"{rate:,.0f} img/s")
        self.heartbeat(lambda: f"{self.title} epoch {self.epoch + 1}/{self.epochs}  step {self.done}/{self.steps}  "
                               f"{rate:,.0f} img/s")

    def epoch_end(self, row: dict) -> None:
        if self.progress:
            self.progress.update(self.epoch_task, completed=row["epoch"])
        self.note(f"{self.title} epoch {row['epoch']}/{self.epochs}  loss {row['train_loss']:.4f}  "
                  f"train acc {row['train_acc']:.4f}  test acc {row['test_acc']:.4f}  "
                  f"{row['img_per_s']:,.0f} img/s")


class TaskProgress(_Bars):
    """One bar over `total` items with a rate; a summary line at the end."""

    def __init__(self, title: str, total: int, unit: str = "img"):
        super().__init__()
        self.title, self.unit, self.done, self.total = title, unit, 0, total
        if self.progress:
            self.task = self.progress.add_task(title, total=total, rate="")

    def __enter__(self):
        self.started = time.perf_counter()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if exc[0] is None:
            print(f"{self.title}: {self.done:,} {self.unit} at {self.rate():,.1f} {self.unit}/s", file=sys.stderr)

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.started, 1e-9)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self.progress:
            self.progress.update(self.task, advance=n, rate=f"{self.rate():,.0f} {self.unit}/s")
        self.heartbeat(lambda: f"{self.title}: {self.done:,}/{self.total:,} {self.unit} at {self.rate():,.1f} "
                               f"{self.unit}/s")


class Live:
    """dvclive logger for per-epoch curves (`dvc plots show` renders its TSV files), written beside `path` and put
    in its place only when the stage succeeds: a failed run keeps the last good run's curves."""

    def __init__(self, path: Path):
        self.path = path
        self.folder = contextlib.ExitStack()

    def __enter__(self):
        try:
            from dvclive import Live as DvcLive
        except ImportError:  # e.g. a GPU box running the stages without dvc: the manifest keeps the history
            print("dvclive not installed: per-epoch curves are kept in the output manifest only", file=sys.stderr)
            self.live = None
            return self
        from pipeline.io import atomic_dir

        tmp = self.folder.enter_context(atomic_dir(self.path))
        self.live = DvcLive(str(tmp), save_dvc_exp=False, dvcyaml=None, report=None)
        return self

    def __exit__(self, *exc):
        if self.live:
            self.live.end()
        return self.folder.__exit__(*exc)

    def log(self, row: dict) -> None:
        if not self.live:
            return
        for key, value in row.items():
            if key != "epoch" and not key.endswith("seconds"):  # timings are not curves
                self.live.log_metric(key, value)
        self.live.next_step()


@contextlib.contextmanager
def training_callbacks(title: str, epochs: int, live_dir: Path):
    """Progress display and dvclive curves for `pipeline.train.fit`; none on ranks other than 0 (torchrun)."""
    from pipeline import distributed

    if not distributed.is_main():
        yield {}
        return
    with EpochProgress(title, epochs) as progress, Live(live_dir) as live:
        def on_epoch(row: dict) -> None:
            progress.epoch_end(row)
            live.log(row)

        yield {"on_epoch_start": progress.epoch_start, "on_step": progress.step, "on_epoch": on_epoch}

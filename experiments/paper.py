"""The paper's experiment (issue 7): run its grid in resumable chunks, keep every run's raw metrics, make the table.

    python experiments/paper.py plan                                  # cells in run order, with their overrides
    python experiments/paper.py run --work /tmp/paper --jobs 4 --budget-s 540 [-S key=value ...]
    python experiments/paper.py table [--write docs/RESULTS.md]
    python experiments/paper.py queue                                 # the grid as `dvc exp run --queue` commands

`run` calls the stage commands directly (the GPU machines have no dvc), shares data, teacher, scores and cache
between the cells that can share them, trains up to --jobs students at once on one device (making the next cell's
scores and cache meanwhile, so no slot waits for them), and after each finished run rewrites
experiments/results/<cell>.json: a chunk cut short keeps what it finished and the next chunk skips it. The params
file, the grid and extra -S overrides (e.g. fewer epochs for a smoke run) key the work folder, so outputs made
otherwise are never reused; runs already in experiments/results are skipped, and `run` refuses to start while one
of them was made with other params than the grid now gives it (edit the grid, delete those runs). An
ablation run whose criterion selects, from the same teacher training, the teacher layers of the main (Q) cell's run
with the same method and seed would repeat it: that run is recorded for it (`same_run_as`) instead. `--teacher-bank`
restores a teacher an earlier session trained on these params and data instead of training it (teacher_bank.py).
The grid and the results files: paper_grid.py; the table: paper_table.py.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable

from paper_grid import GRID, RESULTS, Cell, load_grid, merged, methods_override, read_cell, read_runs
from paper_table import describe, table, time_split, write_table
from pipeline.errors import InputError, error_line
from pipeline.io import manifest_id, read_json, write_json

ROOT = Path(__file__).resolve().parents[1]


def _bad_input(message: str) -> int:
    print(error_line(message), file=sys.stderr)
    return 2


class StageFailed(RuntimeError):
    pass


class Runner:
    """Stage commands under one work folder, each output made once and reused while it exists."""

    def __init__(self, params: Path, work: Path, extra: list[str], jobs: int, key: str = "",
                 bank: Path | None = None):
        """`key` (e.g. the grid's text) joins the params file and `extra` in naming the work folder; `bank` holds
        teachers to restore instead of training them (teacher_bank.py)."""
        self.params = params
        self.bank = bank
        digest = hashlib.sha256("\n".join([params.read_text(), key, *extra]).encode()).hexdigest()[:10]
        self.root = work / digest
        self.extra = extra
        # each stage process its share of the cores: torch's CPU threads of concurrent runs, all spinning on
        # every core, made 2 tiny runs at once on 2 cores train 17x slower than one alone
        self.env = {**os.environ, "OMP_NUM_THREADS": str(max(1, usable_cores() // jobs))}
        self.failures: dict[Path, StageFailed] = {}  # an output that failed once (e.g. a shared teacher): not again

    def kd(self, stage: str, overrides: list[str], out: Path, *args: str) -> Path:
        if (out / "manifest.json").is_file():
            return out
        if out in self.failures:
            raise self.failures[out]
        out.parent.mkdir(parents=True, exist_ok=True)
        sets = [x for o in [*overrides, *self.extra] for x in ("-S", o)]
        cmd = [sys.executable, "-m", "stages.cli", stage, "-p", str(self.params), *sets, "--out", str(out), *args]
        log = out.parent / f"{out.name}.log"
        with open(log, "w") as f:
            code = subprocess.run(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT).returncode
        if code:
            tail = log.read_text().strip().splitlines()[-1:] or [""]
            self.failures[out] = StageFailed(f"{stage} -> {out} failed (exit {code}): {tail[0]} (log: {log})")
            raise self.failures[out]
        return out

    def cache_dir(self, cell: Cell) -> Path:
        return self.root / cell.regime / cell.criterion / "cache"  # both students' cells share it

    def teacher_dir(self, cell: Cell) -> Path:
        """Data, teacher and scores of every cell with the same prepare and teacher params."""
        return self.root / f"teacher-{cell.key('prepare', 'teacher')}"

    def prepare_cell(self, cell: Cell, needs_cache: Callable[[dict], bool] = lambda context: True) -> dict:
        """Data, teacher, scores and, if `needs_cache(the cell's context)`, the cache of `cell`; returns the folders
        and the cell's context for results (teacher, its id, selection, layer scores)."""
        print(f"{cell.name}: preparing data, teacher, scores and cache", flush=True)
        shared = self.teacher_dir(cell)
        sets = [*cell.overrides, methods_override(cell.methods)]  # the cache holds the layers of all its methods
        data = self.kd("prepare", sets, shared / "data")
        if self.bank is not None and not (shared / "teacher" / "manifest.json").is_file():
            self.restore_teacher(cell, sets, data, shared)
        teacher = self.kd("teacher", sets, shared / "teacher", "--data", str(data),
                          "--metrics", str(shared / "teacher.json"), "--live-dir", str(shared / "live-teacher"),
                          "--resume-dir", str(self.root / "resume"))
        scores = self.kd("score", sets, shared / f"scores-{cell.key('score')}", "--data", str(data),
                         "--teacher", str(teacher))
        with open(scores / "layers.csv") as f:
            layers = [{k: float(row[k]) for k in ("layer", "S", "I", "E", "Q", "sqrtIE")} for row in csv.DictReader(f)]
        context = {"teacher": read_json(shared / "teacher.json"), "selection": read_json(scores / "selection.json"),
                   "layers": layers, "teacher_id": manifest_id(read_json(teacher / "manifest.json"))}
        cache = None
        if needs_cache(context):
            cache = self.kd("cache", sets, self.cache_dir(cell), "--data", str(data), "--teacher",
                            str(teacher), "--scores", str(scores))
        return {"data": data, "teacher": teacher, "scores": scores, "cache": cache, "context": context}

    def restore_teacher(self, cell: Cell, sets: list[str], data: Path, shared: Path) -> None:
        """The teacher the teacher stage would train here, from the bank if it holds it."""
        from pipeline.config import load_params
        from pipeline.io import read_manifest
        from pipeline.teacher import training_key
        from teacher_bank import restore

        cfg = load_params(self.params, [*sets, *self.extra])
        ident = training_key(cfg.recorded_for("teacher"), manifest_id(read_manifest(data, "prepare")))
        restored = restore(self.bank, ident, shared)
        print(f"{cell.name}: teacher {ident} " + (f"restored from {self.bank}, not trained" if restored else
                                                  f"not in {self.bank} (no complete, intact set): trained"), flush=True)

    def run_dir(self, cell: Cell, method: str, seed: int, tag: str = "") -> Path:
        return self.root / cell.regime / cell.criterion / cell.student / f"{method}-s{seed}{tag}"

    def student_run(self, cell: Cell, folders: dict, method: str, seed: int, jobs: int, since: float,
                    tag: str = "") -> dict:
        """Train one student and fit its probe, up to `jobs` runs sharing the device; the raw metrics of the run
        (kept in its folder once complete), its start counted in seconds from `since` (perf_counter)."""
        run = self.run_dir(cell, method, seed, tag)
        if (run / "run.json").is_file():
            return read_json(run / "run.json")
        sets = cell.run_overrides(method, seed)
        start = time.perf_counter()
        student = self.kd("student", sets, run / "student", "--data", str(folders["data"]), "--teacher",
                          str(folders["teacher"]), "--scores", str(folders["scores"]), "--cache",
                          str(folders["cache"]), "--metrics", str(run / "student.json"), "--live-dir",
                          str(run / "live"), "--resume-dir", str(self.root / "resume"))
        student_seconds = time.perf_counter() - start
        self.kd("probe", sets, run / "probe", "--data", str(folders["data"]), "--student", str(student),
                "--metrics", str(run / "probe.json"))
        probe_seconds = time.perf_counter() - start - student_seconds
        trained, probe = read_json(run / "student.json"), read_json(run / "probe.json")
        manifest = read_json(student / "manifest.json")
        entry = {"method": method, "seed": seed, "test_acc": trained["test_acc"],
                 "best_test_acc": trained["best_test_acc"], "best_epoch": trained["best_epoch"],
                 "epochs": trained["epochs"], "probe_test_acc": probe["probe_test_acc"],
                 "teacher_layers": trained["teacher_layers"], "train_seconds": trained["train_seconds"],
                 "train_img_per_s": trained["train_img_per_s"], "eval_seconds": trained["eval_seconds"],
                 "checkpoint_seconds": trained["checkpoint_seconds"], "setup_seconds": trained["setup_seconds"],
                 "probe_fit_seconds": probe["fit_seconds"],
                 "student_stage_seconds": round(student_seconds, 1), "probe_stage_seconds": round(probe_seconds, 1),
                 "teacher_test_acc": folders["context"]["teacher"]["test_acc"],
                 "teacher_id": folders["context"]["teacher_id"],  # which training
                 "started_s": round(start - since, 1), "wall_seconds": round(time.perf_counter() - start, 1),
                 "jobs": jobs,
                 "device": device_name(), "overrides": merged(sets, self.extra),
                 "params_hash": manifest["params_hash"],
                 "upstream_hash": run_hashes(self.params, cell, method, seed, self.extra)["upstream_hash"],
                 "code_version": manifest["code_version"]}
        write_json(run / "run.json", entry)
        return entry


def _other_variant(path: Path, info: dict) -> str | None:
    """Why the runs in `path` are not this invocation's variant of the grid (another params file or other extra
    overrides, where they lie being no variant), else None: their runs would be skipped as done."""
    def variant(record: dict) -> list:
        extra = record.get("extra_overrides", [])
        return [record.get("params"), [o for o in extra if not o.startswith(("prepare.root=", "prepare.cache_dir="))]]

    if not path.is_file():
        return None
    saved, wanted = variant(read_cell(path)), variant(info)
    if saved == wanted:
        return None
    return (f"{path} holds runs of params {saved[0]} with overrides {saved[1]}, not {wanted[0]} with "
            f"{wanted[1]}: give this variant its own --results folder")


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not all the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device_name() -> str:
    import torch  # here, not at the top: `plan`, `table` and `queue` need no torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class Chunk:
    """One `run` invocation's runs, in order: up to `jobs` students at once on the device; each cell's data,
    teacher, scores and cache made on one preparer thread ahead of its runs; an ablation run whose criterion picks
    the teacher layers of the main (Q) cell's run with the same method and seed recorded as that run, not trained."""

    def __init__(self, runner: Runner, todo: list[tuple[Cell, str, int]], results: Path, info: dict, jobs: int,
                 caps: dict[str, int], budget_s: float, drop_caches: bool, expect_s: float | None = None):
        self.runner, self.results, self.info = runner, results, info
        self.todo = list(todo)
        self.asked = [(cell, f"{method}-s{seed}") for cell, method, seed in todo]
        self.max_jobs, self.caps, self.budget_s, self.drop_caches = jobs, caps, budget_s, drop_caches
        self.expect_s = expect_s
        self.start = time.perf_counter()
        self.longest = recorded_wall_seconds(results)  # (regime, student) -> its longest run, recorded or here
        self.failed: list[str] = []
        self.errors: dict[tuple[str, str], Exception] = {}  # (cell, run) -> why it failed
        self.prepared: dict[str, Future] = {}  # cell name -> its folders and context
        self.running: dict[Future, tuple[Cell, str]] = {}
        self.twins: dict[tuple[str, str], str | None] = {}  # (cell, run) -> the main cell whose run it repeats
        self.waiting: dict[tuple[str, str], list[Cell]] = {}  # (main cell, run) -> cells to record that run in

    def jobs(self, cell: Cell) -> int:
        """Runs at once while a run of `cell` starts: the regime's cap (memory) or --jobs."""
        return min(self.max_jobs, self.caps.get(cell.regime, self.max_jobs))

    def run(self) -> None:
        with ThreadPoolExecutor(self.max_jobs) as self.pool, ThreadPoolExecutor(1) as self.preparer:
            while self.todo or self.running:
                self.start_runs()
                if not self.running:
                    break
                preparing = {f for f in self.prepared.values() if not f.done()}
                done, _ = wait({*self.running, *preparing}, return_when=FIRST_COMPLETED)
                for future in done & self.running.keys():
                    self.finish(future)

    def start_runs(self) -> None:
        """Start runs in order while slots are free, those of cells the budget has no room for left out; with runs
        going, stop at one whose cell is not prepared yet (with none going, wait for it)."""
        while self.todo and len(self.running) < self.jobs(self.todo[0][0]):
            cell, method, seed = self.todo[0]
            if cell.name not in self.prepared and self.over_budget(cell):  # (nor its teacher, scores and cache)
                continue
            folders = self.prepare(cell)
            # the next cell's scores and cache are made while this one's runs go (same teacher: it exists; a new
            # teacher is not started that the budget may leave unused)
            ahead = next((c for c, *_ in self.todo if c.name != cell.name), None)
            if ahead is not None and self.runner.teacher_dir(ahead) == self.runner.teacher_dir(cell):
                self.prepare(ahead)
            if self.running and not folders.done():
                return
            try:
                ready = folders.result()
            except Exception as error:  # the cell's runs cannot start; the other cells' still can
                keys = [f"{m}-s{s}" for c, m, s in self.todo if c == cell]
                self.fail(cell, ", ".join(keys), error)
                self.todo = [item for item in self.todo if item[0] != cell]
                continue
            key = f"{method}-s{seed}"
            main = self.twins[(cell.name, key)]
            if main is None and self.over_budget(cell):  # making its teacher, scores and cache took time too
                continue
            self.todo.pop(0)
            if main is None:
                future = self.pool.submit(self.runner.student_run, cell, ready, method, seed, self.jobs(cell),
                                          self.start)
                self.running[future] = (cell, key)
                continue
            self.waiting.setdefault((main, key), []).append(cell)
            recorded = read_runs(self.results / f"{main}.json").get(key)
            if recorded is not None:
                self.record_twins(main, key, recorded)
            elif (main, key) in self.errors:
                self.fail_twins(main, key)

    def over_budget(self, cell: Cell) -> bool:
        """Whether a run of `cell` started now would end past the budget, by the longest of its regime and student
        (recorded or run here; none yet: --expect-s, else the longest of any), and if so, its runs are left out."""
        expected = self.longest.get((cell.regime, cell.student),
                                    self.expect_s or max(self.longest.values(), default=0.0))
        left = self.budget_s - (time.perf_counter() - self.start)
        if expected <= left:
            return False
        dropped = [item for item in self.todo if item[0] == cell]
        self.todo = [item for item in self.todo if item[0] != cell]
        print(f"budget: not starting {len(dropped)} runs of {cell.name} (~{expected:.0f} s each, {left:.0f} s left)",
              flush=True)
        return True

    def fail(self, cell: Cell, what: str, error: Exception) -> None:
        if not isinstance(error, (StageFailed, InputError)):  # not a message of ours: name it
            error = f"{type(error).__name__}: {error}"
        self.failed.append(f"{cell.name} {what}: {error}")
        print(f"FAILED {self.failed[-1]}", flush=True)

    def prepare(self, cell: Cell) -> Future:
        """The cell's folders, made on the preparer thread: one cell at a time, in the order asked."""
        if cell.name not in self.prepared:
            def needs_cache(context: dict) -> bool:  # decides, once, which of the cell's runs are twins
                mine = [key for c, key in self.asked if c == cell]
                self.twins.update({(cell.name, key): self.twin(cell, key, context) for key in mine})
                return any(self.twins[(cell.name, key)] is None for key in mine)

            self.prepared[cell.name] = self.preparer.submit(self.runner.prepare_cell, cell, needs_cache)
        return self.prepared[cell.name]

    def twin(self, cell: Cell, key: str, context: dict) -> str | None:
        """The main (Q) cell whose run `key` this ablation run would repeat: the same teacher training and the same
        layers selected from it, that run recorded or in this chunk."""
        main = f"{cell.regime}-{cell.student}-Q"
        if cell.criterion == "Q":
            return None
        ours = (context["teacher_id"], context["selection"]["layers"])
        done = read_runs(self.results / f"{main}.json").get(key)
        if done is not None:
            return main if (done.get("teacher_id"), done["teacher_layers"]) == ours else None
        prepared = self.prepared.get(main)
        if prepared is None or not prepared.done() or prepared.exception():  # (the preparer cannot wait for itself)
            return None
        theirs = prepared.result()["context"]
        same = (theirs["teacher_id"], theirs["selection"]["layers"]) == ours
        return main if same and any(c.name == main and k == key for c, k in self.asked) else None

    def finish(self, future: Future) -> None:
        """Record a finished run (and the ablation runs that are it); drop caches no later run needs."""
        cell, key = self.running.pop(future)
        try:
            entry = future.result()
        except Exception as error:  # a run's failure, of any kind, is its own: recorded runs stay, the others go on
            self.fail(cell, key, error)
            self.errors[(cell.name, key)] = error
            self.fail_twins(cell.name, key)
            return
        group = (cell.regime, cell.student)
        self.longest[group] = max(self.longest.get(group, 0.0), entry["wall_seconds"])
        self.record(cell, key, entry)
        print(f"{cell.name} {key}: top-1 {100 * entry['test_acc']:.2f} %, probe {100 * entry['probe_test_acc']:.2f} "
              f"%, {entry['wall_seconds']:.0f} s ({describe(time_split(entry))})", flush=True)
        self.record_twins(cell.name, key, entry)
        later = [c for c, *_ in self.todo] + [c for c, _ in self.running.values()]
        if self.drop_caches and all(self.runner.cache_dir(c) != self.runner.cache_dir(cell) for c in later):
            shutil.rmtree(self.runner.cache_dir(cell))  # the full regime's caches fill a 64 GB disk

    def fail_twins(self, main: str, key: str) -> None:
        for copy in self.waiting.pop((main, key), []):  # ablation runs that were to be this one
            self.fail(copy, key, self.errors[(main, key)])

    def record_twins(self, main: str, key: str, entry: dict) -> None:
        for copy in self.waiting.pop((main, key), []):
            self.record(copy, key, {**entry, "same_run_as": main})
            print(f"{copy.name} {key}: the same teacher layers as {main}: its run, not trained again", flush=True)

    def record(self, cell: Cell, key: str, entry: dict) -> None:
        """Into experiments/results/<cell>.json, with the cell's context (teacher, selection, layer scores): the
        latest at the top, and by teacher id that of every teacher training its runs distilled from."""
        path = self.results / f"{cell.name}.json"
        saved = read_cell(path) if path.is_file() else {"runs": {}}
        context = self.prepared[cell.name].result()["context"]
        saved.update({"cell": cell.name, "regime": cell.regime, "student": cell.student, "criterion": cell.criterion,
                      "overrides": cell.overrides, **self.info, **context})
        saved.setdefault("teachers", {})[entry["teacher_id"]] = context
        saved["runs"][key] = entry
        write_json(path, saved)


def run(args) -> int:
    grid, cells = load_grid(args.grid)
    if not (ROOT / grid["params"]).is_file():
        raise InputError(f"the grid's params file {ROOT / grid['params']} does not exist")
    runner = Runner(ROOT / grid["params"], args.work, args.set, args.jobs, args.grid.read_text(),
                    args.teacher_bank)
    info = {"params": grid["params"], "extra_overrides": args.set}
    unknown = sorted(set(args.cells or ()) - {cell.name for cell in cells})
    if unknown:
        return _bad_input(f"unknown cells {unknown}: `paper.py plan` lists them")
    for cell in cells:
        mixed = _other_variant(args.results / f"{cell.name}.json", info)
        if mixed:
            return _bad_input(mixed)
    changed = changed_runs(cells, args.results, runner.params, args.set)
    if changed:
        return _bad_input(f"{len(changed)} recorded runs were made with other params than the grid gives them now "
                          f"(e.g. {changed[0]}): delete them from {args.results}, or restore the grid")
    todo = runs_to_do(cells, grid["seeds"], args.results, args.cells)
    print(f"{len(todo)} runs to do; work folder {runner.root}", flush=True)
    chunk = Chunk(runner, todo, args.results, info, args.jobs, grid.get("max_jobs", {}), args.budget_s,
                  args.drop_caches, args.expect_s)
    chunk.run()
    print(f"done in {time.perf_counter() - chunk.start:.0f} s", flush=True)
    if chunk.failed:
        print(f"{len(chunk.failed)} failed (the other runs are recorded):", *chunk.failed, sep="\n  ", file=sys.stderr)
        return 1
    return 0


def runs_to_do(cells: list[Cell], seeds: list[int], results: Path,
               only: list[str] | None = None) -> list[tuple[Cell, str, int]]:
    """The runs not recorded yet (of the cells named in `only`), seed-major: a chunk cut short has compared all
    methods on the seeds it finished, with one teacher (a later chunk on a fresh machine trains its own)."""
    return [(cell, method, seed) for cell in cells if not only or cell.name in only
            for seed in seeds for method in cell.methods
            if f"{method}-s{seed}" not in read_runs(results / f"{cell.name}.json")]


def run_hashes(params: Path, cell: Cell, method: str, seed: int, extra: list[str]) -> dict[str, str]:
    """The hashes the grid gives a run now, none where the stages would refuse its params: `params_hash`, of its
    student's params as its manifest records them, and `upstream_hash`, of the params its data, teacher, scores and
    probe are made with (`prepare_cell` trains the teacher on the cell's overrides, so with the params file's seed),
    where the data lie left out."""
    from pipeline.config import load_params
    from pipeline.io import hash_obj

    try:
        shared = load_params(params, merged(cell.overrides, extra))
        run = load_params(params, merged(cell.run_overrides(method, seed), extra))
    except InputError:
        return {}
    upstream = {"seed": shared.seed, "prepare": shared.prepare.recorded(), "teacher": shared.teacher.recorded(),
                "score": shared.score.recorded(), "probe": run.probe.recorded()}
    return {"params_hash": hash_obj(run.recorded_for("student")), "upstream_hash": hash_obj(upstream)}


def changed_runs(cells: list[Cell], results: Path, params: Path, extra: list[str]) -> list[str]:
    """The recorded runs made with other params than the grid gives them now, their student's or those of their
    data, teacher, scores or probe: they would be taken for done. A run recorded for an ablation cell as its main
    cell's (`same_run_as`) is checked as that cell's."""
    by_name = {cell.name: cell for cell in cells}
    changed = []
    for cell in cells:
        for key, entry in read_runs(results / f"{cell.name}.json").items():
            made_as = by_name.get(entry.get("same_run_as", cell.name))
            now = run_hashes(params, made_as, entry["method"], entry["seed"], extra) if made_as else {}
            if any(now.get(name) != entry[name] for name in ("params_hash", "upstream_hash") if name in entry):
                changed.append(f"{cell.name} {key}")
    return changed


def recorded_wall_seconds(results: Path) -> dict[tuple[str, str], float]:
    """The longest recorded run per (regime, student): what the budget expects of their next run."""
    longest: dict[tuple[str, str], float] = {}
    for path in results.glob("*.json"):
        saved = read_cell(path)
        for entry in saved["runs"].values():
            group = (saved["regime"], saved["student"])
            longest[group] = max(longest.get(group, 0.0), entry["wall_seconds"])
    return longest


def queue_commands(grid_path: Path = GRID, extra: list[str] = ()) -> list[str]:
    """One queued experiment per cell, and one per method with overrides of its own (a matrix shares params)."""
    grid, cells = load_grid(grid_path)
    seeds = f"seeds=[{','.join(map(str, grid['seeds']))}]"
    commands = []
    for cell in cells:
        own = [m for m in cell.methods if m in cell.method_overrides]
        shared = [m for m in cell.methods if m not in own]
        groups = ([(cell.name, shared, [])] if shared else []) + [
            (f"{cell.name}-{m}", [m], cell.method_overrides[m]) for m in own]
        for name, methods, sets in groups:
            sets = merged(cell.overrides, [methods_override(methods)], sets, [seeds], extra)
            commands.append(" ".join(["dvc exp run --queue -n", name, *[f"-S '{o}'" for o in sets]]))
    return commands


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=GRID)
    ap.add_argument("--results", type=Path, default=RESULTS)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("plan")
    run_ap = sub.add_parser("run")
    run_ap.add_argument("--work", type=Path, required=True, help="folder for data, models and caches")
    run_ap.add_argument("--jobs", type=_positive, default=1, help="student runs at once on one device")
    run_ap.add_argument("--budget-s", type=float, default=float("inf"), help="start no run that would end later")
    run_ap.add_argument("--expect-s", type=float, help="seconds a run of a regime and student with no recorded run "
                        "is expected to take (default: as long as the longest recorded run of any)")
    run_ap.add_argument("--cells", nargs="*", help="only these cells")
    run_ap.add_argument("--drop-caches", action="store_true", help="delete a feature cache once no run needs it")
    run_ap.add_argument("-S", "--set", action="append", default=[], help="extra override for every stage")
    run_ap.add_argument("--teacher-bank", type=Path, help="teachers to restore, not train (teacher_bank.py)")
    table_ap = sub.add_parser("table")
    table_ap.add_argument("--write", type=Path, help="replace the marked section of this Markdown file")
    queue_ap = sub.add_parser("queue")
    queue_ap.add_argument("-S", "--set", action="append", default=[])
    args = ap.parse_args(argv)
    try:
        return _command(args)
    except InputError as err:
        return _bad_input(str(err))


def _command(args) -> int:
    if args.command == "plan":
        grid, cells = load_grid(args.grid)
        for cell in cells:
            done, total = len(read_runs(args.results / f"{cell.name}.json")), len(cell.methods) * len(grid["seeds"])
            print(f"{cell.name:28s} {done:3d}/{total} runs  {' '.join(cell.overrides)} {methods_override(cell.methods)}")
        return 0
    if args.command == "run":
        return run(args)
    if args.command == "table":
        text = table(args.results, args.grid)
        if args.write:
            write_table(args.write, text)
        print(text, end="")
        return 0
    print("\n".join(["# from a commit whose params.yaml is the grid's base params file:", *queue_commands(
        args.grid, args.set), "dvc queue start -j 2"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

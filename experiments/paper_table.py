"""The results table of the paper's experiment, made from experiments/results/*.json (docs/RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

from paper_grid import GRID, load_grid, read_cell
from pipeline.io import write_text

BEGIN, END = "<!-- paper-experiment:begin -->", "<!-- paper-experiment:end -->"


def time_split(entry: dict) -> dict[str, float]:
    """Where a run's wall time went: the student stage's set-up (model, teacher features, data on the device),
    training epochs, evaluations, resume checkpoints and the rest (process start-up, loading, saving); the probe's
    L-BFGS fits and the rest of its stage. Entries recorded before set-up and fits were timed count them in the rest."""
    parts = {"setup": entry.get("setup_seconds", 0.0), "train": entry["train_seconds"], "eval": entry["eval_seconds"],
             "checkpoints": entry["checkpoint_seconds"]}
    parts["student start-up/saving"] = entry["student_stage_seconds"] - sum(parts.values())
    parts["probe fits"] = entry.get("probe_fit_seconds", 0.0)
    parts["probe rest"] = entry["probe_stage_seconds"] - parts["probe fits"]
    return parts


def describe(split: dict[str, float]) -> str:
    return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in split.items())


def _pm(values: list[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.2f}"  # one seed has no spread to show
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def _teachers(runs) -> str:
    """The test top-1 of the teachers these runs distilled from: several where chunks trained their own."""
    return " / ".join(f"{100 * acc:.2f}" for acc in sorted({r["teacher_test_acc"] for r in runs}))


def _rows(cell: dict, method: str) -> list[dict]:
    return [r for r in cell["runs"].values() if r["method"] == method]


def table(results: Path, grid_path: Path = GRID) -> str:
    """Markdown: per regime and student, the methods table and the layer-criterion ablation; mean ± std."""
    grid, _ = load_grid(grid_path)
    cells = {c["cell"]: c for c in map(read_cell, sorted(results.glob("*.json")))}
    out = []
    for regime in grid["regimes"]:
        for student in grid["students"]:
            main = cells.get(f"{regime}-{student}-Q")
            if main is None:
                continue
            runs = main["runs"].values()
            devices = ", ".join(sorted({f"{r['device']} ({r['jobs']} runs at a time)" for r in runs}))
            teachers = _teachers(runs)
            selected = " / ".join(sorted({str(r["teacher_layers"]) for r in _rows(main, "ours")}))
            out += [f"### {regime}, {student} student", "",
                    f"Teacher test top-1 {teachers} % (one value per teacher trained for these runs); layers selected "
                    f"by Q: {selected}. Device: {devices}.", "",
                    "| method | seeds | last-epoch top-1 (%) | best-epoch top-1 (%) | linear probe (%) | s/run |",
                    "|---|---|---|---|---|---|"]
            for method in grid["methods"]:
                rows = _rows(main, method)
                if rows:
                    wall = sum(r["wall_seconds"] for r in rows) / len(rows)
                    out.append(f"| {method} | {len(rows)} | {_pm([r['test_acc'] for r in rows])} | "
                               f"{_pm([r['best_test_acc'] for r in rows])} | "
                               f"{_pm([r['probe_test_acc'] for r in rows])} | {wall:.0f} |")
            out += ["", f"Layer criterion ablation ({grid['ablation']['method']}):", "",
                    "| criterion | teacher layers | seeds | last-epoch top-1 (%) | linear probe (%) | "
                    "teacher top-1 (%) |",
                    "|---|---|---|---|---|---|"]
            for criterion in ["Q", *grid["ablation"]["criteria"]]:
                cell = cells.get(f"{regime}-{student}-{criterion}")
                rows = _rows(cell, grid["ablation"]["method"]) if cell else []
                if rows:
                    layers = " / ".join(sorted({str(r["teacher_layers"]) for r in rows}))
                    copies = sum("same_run_as" in r for r in rows)
                    if copies:
                        layers += " (Q's runs)" if copies == len(rows) else f" ({copies} of them Q's runs)"
                    out.append(f"| {criterion} | {layers} | {len(rows)} | "
                               f"{_pm([r['test_acc'] for r in rows])} | {_pm([r['probe_test_acc'] for r in rows])} | "
                               f"{_teachers(rows)} |")
            out += ["", q_chart(main), ""]
    return "\n".join(out).rstrip() + "\n" if out else "No runs yet.\n"


def q_chart(cell: dict) -> str:
    """Q per teacher layer as a Mermaid line chart (rendered by GitHub; no plotting dependency): one line per
    teacher training the cell's runs distilled from (cells recorded before runs named theirs: the latest)."""
    scores = [c["layers"] for c in cell.get("teachers", {}).values()] or [cell["layers"]]
    lines = sorted({tuple(round(row["Q"], 3) for row in layers) for layers in scores})
    title = f"Q per teacher layer ({cell['regime']}" + (f"; {len(lines)} teachers)" if len(lines) > 1 else ")")
    return "\n".join(["```mermaid", "xychart-beta", f'  title "{title}"',
                      f"  x-axis [{', '.join(str(int(row['layer'])) for row in scores[0])}]", '  y-axis "Q"',
                      *[f"  line [{', '.join(map(str, q))}]" for q in lines], "```"])


def write_table(doc: Path, text: str) -> None:
    """Replace the marked section of `doc` (appended when absent)."""
    current = doc.read_text() if doc.is_file() else ""
    block = f"{BEGIN}\n{text}{END}"
    if BEGIN in current and END in current:
        head, rest = current.split(BEGIN, 1)
        current = head + block + rest.split(END, 1)[1]
    else:
        current = current.rstrip() + ("\n\n" if current else "") + block + "\n"
    write_text(doc, current)

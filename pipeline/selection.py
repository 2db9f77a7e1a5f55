"""Which teacher layers to distil from: the quality metric's top-k, or an explicit list checked against the model."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import InputError
from pipeline.io import read_json, read_verified, write_csv, write_json
from pipeline.quality import select_layers

COLUMNS = ["layer", "S", "I", "E", "Q", "sqrtIE", "dims", "mean_min_intra", "mean_entropy", "M", "r", "K",
           "n_a", "n_b"]


def check_choice(n: int, k: int, explicit: list[int] | None) -> None:
    """Refuse explicit layers outside the teacher's n layers or repeated, or a k above n."""
    if explicit is not None:
        bad = [i for i in explicit if not 0 <= i < n]
        if bad:
            raise InputError(f"score.layers {bad} out of range: the teacher has {n} layers (0..{n - 1})")
        if len(set(explicit)) != len(explicit):
            raise InputError(f"score.layers {explicit} repeats a layer")
    elif k > n:
        raise InputError(f"score.k is {k} but the teacher has only {n} layers")


def choose_layers(rows: list[dict], criterion: str, k: int, explicit: list[int] | None) -> tuple[list[int], str]:
    """Return (layers sorted by depth, how they were chosen)."""
    check_choice(len(rows), k, explicit)
    if explicit is not None:
        return sorted(explicit), "params"
    return select_layers(rows, criterion, k), f"top-{k} by {criterion}"


def write_scores(folder: Path, rows: list[dict], selection: dict) -> None:
    """The `score` stage's files: every layer's scores (layers.json, and layers.csv to read) and the selection."""
    write_json(folder / "layers.json", rows)
    write_csv(folder / "layers.csv", rows, COLUMNS)
    write_json(folder / "selection.json", selection)


def load_selection(scores_dir, teacher_id: str) -> list[int]:
    """The `score` stage's selected layers, refused if changed since written or scored for another teacher."""
    read_verified(scores_dir, "score", {"teacher": teacher_id})
    return read_json(Path(scores_dir) / "selection.json")["layers"]

"""The paper's experiment grid (experiments/paper.yaml) as cells, and the results files paper.py writes per cell."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.errors import InputError
from pipeline.io import read_json

HERE = Path(__file__).resolve().parent
GRID = HERE / "paper.yaml"
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Cell:
    """Runs that share data, teacher, scores and cache: one regime, student and layer criterion."""

    regime: str
    student: str
    criterion: str
    methods: tuple[str, ...]
    regime_overrides: tuple[str, ...]  # the grid's overrides, then the regime's
    method_overrides: dict[str, list[str]]

    @property
    def name(self) -> str:
        return f"{self.regime}-{self.student}-{self.criterion}"

    @property
    def overrides(self) -> list[str]:
        return [*self.regime_overrides, f"student.model.arch={self.student}", f"score.criterion={self.criterion}"]

    def key(self, *sections: str) -> str:
        """Names the overrides of these params sections: cells that agree on them share those stages' outputs (one
        teacher serves every regime that changes only what the students see)."""
        own = sorted(o for o in self.overrides if o.partition("=")[0].split(".")[0] in sections)
        return hashlib.sha256("\n".join(own).encode()).hexdigest()[:8]

    def run_overrides(self, method: str, seed: int) -> list[str]:
        own = self.method_overrides.get(method, [])
        return merged(self.overrides, own, [f"seed={seed}", f"student.method={method}"])


GRID_KEYS = {"params", "seeds", "regimes", "students", "methods", "ablation"}


def load_grid(path: Path = GRID) -> tuple[dict, list[Cell]]:
    """The grid file's cells; InputError (one line) when the file is missing, malformed or names a run twice."""
    if not path.is_file():
        raise InputError(f"grid file not found: {path}")
    try:
        grid = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise InputError(f"grid {path} is not valid YAML ({type(err).__name__})") from None
    missing = GRID_KEYS - set(grid) if isinstance(grid, dict) else GRID_KEYS
    if missing or not isinstance(grid["ablation"], dict) or not {"method", "criteria"} <= set(grid["ablation"]):
        raise InputError(f"grid {path}: missing {', '.join(sorted(missing)) or 'ablation.method/criteria'}")
    ablation = grid["ablation"]
    if not isinstance(grid["regimes"], dict):
        raise InputError(f"grid {path}: regimes must be a mapping of names to overrides")
    lists = {"seeds": grid["seeds"], "students": grid["students"], "methods": grid["methods"],
             "ablation.criteria": ablation["criteria"]}
    for name, items in lists.items():
        if not isinstance(items, list):
            raise InputError(f"grid {path}: {name} must be a list")
        if len(set(map(str, items))) != len(items):
            raise InputError(f"grid {path}: {name} names an item twice")
    if "Q" in ablation["criteria"]:
        raise InputError(f"grid {path}: ablation.criteria holds Q, the main cells' criterion")
    cells = [Cell(regime, student, criterion, methods, (*grid.get("overrides", []), *overrides),
                  grid.get("method_overrides", {}))
             for regime, overrides in grid["regimes"].items() for student in grid["students"]
             for criterion, methods in [("Q", tuple(grid["methods"]))]
             + [(c, (ablation["method"],)) for c in ablation["criteria"]]]
    return grid, cells


def merged(*lists: list[str]) -> list[str]:
    """key=value overrides with each key once, the last value winning (dvc need not apply repeated -S in order)."""
    out: dict[str, str] = {}
    for item in (item for items in lists for item in items):
        out[item.partition("=")[0]] = item
    return list(out.values())


def methods_override(methods) -> str:
    return f"methods=[{','.join(methods)}]"


def read_cell(path: Path) -> dict:
    """A cell's results file, refused in one line unless it is one."""
    saved = read_json(path)
    if not isinstance(saved, dict) or not {"cell", "regime", "student", "runs"} <= saved.keys():
        raise InputError(f"{path} is not a results file of paper.py")
    return saved


def read_runs(path: Path) -> dict:
    return read_cell(path)["runs"] if path.is_file() else {}

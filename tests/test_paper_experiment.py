"""experiments/paper.py: a small grid run in two chunks on real Fashion-MNIST, then the results table."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.sources import locate_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import paper  # noqa: E402
import paper_table  # noqa: E402

SMALL = {"prepare": {"root": None, "train_subset": 300, "test_subset": 100},
         "teacher": {"model": {"arch": "resnet34", "width": 0.0625}, "train": {"epochs": 1, "batch_size": 32},
                     "device": "cpu"},
         "score": {"subset_a": 100, "subset_b_per_class": 10, "device": "cpu"},
         "cache": {"device": "cpu"},
         "student": {"model": {"arch": "resnet9", "width": 0.0625}, "train": {"epochs": 2, "batch_size": 32},
                     "device": "cpu"},
         "probe": {"device": "cpu"}}


def paper_cli(tmp, *args):
    cmd = [sys.executable, str(ROOT / "experiments/paper.py"), "--grid", str(tmp / "grid.yaml"), "--results",
           str(tmp / "results"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("paper")
    SMALL["prepare"]["root"] = str(locate_fashion_mnist(None, tmp / "download"))
    (tmp / "params.yaml").write_text(yaml.safe_dump(SMALL))
    (tmp / "grid.yaml").write_text(yaml.safe_dump({
        "params": str(tmp / "params.yaml"), "seeds": [0, 1], "regimes": {"small": []}, "students": ["resnet9"],
        "methods": ["ce", "ours"], "ablation": {"method": "ours", "criteria": ["S"]}}))
    first = paper_cli(tmp, "run", "--work", str(tmp / "work"), "--jobs", "2", "--cells", "small-resnet9-Q")
    assert "4 runs to do" in first
    assert re.search(r"ours-s1: .* s \(setup [\d.]+ s, train [\d.]+ s, eval [\d.]+ s, checkpoints 0\.0 s, "
                     r"student start-up/saving [\d.]+ s, probe fits [\d.]+ s, probe rest [\d.]+ s\)",
                     first)  # where each run's time went
    second = paper_cli(tmp, "run", "--work", str(tmp / "work"), "--jobs", "2", "--drop-caches")  # the rest only
    assert "2 runs to do" in second
    work = next((tmp / "work").iterdir())
    assert not (work / "small/S/cache").exists()  # its runs are done; Q's cache was not used by this chunk
    assert (work / "small/Q/cache/manifest.json").is_file() and len(list(work.glob("*/scores-*/manifest.json"))) == 2
    return tmp


def test_every_run_is_recorded_with_its_metrics(grid):
    main = json.loads((grid / "results/small-resnet9-Q.json").read_text())
    assert set(main["runs"]) == {"ce-s0", "ce-s1", "ours-s0", "ours-s1"}
    work = next((grid / "work").iterdir())
    for key, entry in main["runs"].items():
        student = json.loads((work / f"small/Q/resnet9/{key}/student.json").read_text())
        assert entry["test_acc"] == student["test_acc"] and entry["epochs"] == 2
        assert 0 < entry["probe_test_acc"] <= 1
        assert 0 < entry["train_seconds"] < entry["student_stage_seconds"] < entry["wall_seconds"]  # probe after
        assert entry["student_stage_seconds"] + entry["probe_stage_seconds"] == pytest.approx(entry["wall_seconds"],
                                                                                               abs=0.5)
        assert entry["eval_seconds"] > 0 and entry["checkpoint_seconds"] == 0  # runs shorter than resume_every_s
        split = paper_table.time_split(entry)
        assert (split["setup"], split["train"], split["eval"], split["probe fits"]) == (
            student["setup_seconds"], student["train_seconds"], student["eval_seconds"], entry["probe_fit_seconds"])
        assert split["setup"] > 0 and split["probe fits"] > 0
        assert split["student start-up/saving"] > 0 and split["probe rest"] > 0  # process start-up at least
        manifest = json.loads((work / f"small/Q/resnet9/{key}/student/manifest.json").read_text())
        assert entry["code_version"] == manifest["code_version"]
        assert manifest["environment"]["cpu_threads"] == max(1, paper.usable_cores() // 2)  # 2 at once share cores
    assert main["runs"]["ours-s0"]["teacher_layers"] == main["selection"]["layers"]
    assert {"seed=1", "student.method=ours", "score.criterion=Q"} <= set(main["runs"]["ours-s1"]["overrides"])
    assert main["runs"]["ours-s0"]["test_acc"] != main["runs"]["ours-s1"]["test_acc"]  # seeds really differ
    ablation = json.loads((grid / "results/small-resnet9-S.json").read_text())
    assert set(ablation["runs"]) == {"ours-s0", "ours-s1"} and ablation["selection"]["criterion"] == "S"
    assert len(main["layers"]) == 18 and {r["device"] for r in main["runs"].values()} == {"cpu"}


def test_nothing_is_redone_and_a_budget_shorter_than_a_recorded_run_starts_nothing(grid):
    before = (grid / "results/small-resnet9-Q.json").read_text()
    assert "0 runs to do" in paper_cli(grid, "run", "--work", str(grid / "work"))
    results = json.loads(before)
    del results["runs"]["ce-s1"]
    (grid / "results/small-resnet9-Q.json").write_text(json.dumps(results))
    shortest = min(entry["wall_seconds"] for entry in results["runs"].values())
    # the first run of a chunk is expected to take as long as the longest recorded of its regime and student
    assert "budget: not starting 1 runs of small-resnet9-Q" in paper_cli(grid, "run", "--work", str(grid / "work"),
                                                                         "--budget-s", str(shortest / 2))
    out = paper_cli(grid, "run", "--work", str(grid / "work"))  # the student's outputs exist: only recorded again
    assert "1 runs to do" in out
    assert json.loads((grid / "results/small-resnet9-Q.json").read_text())["runs"] == json.loads(before)["runs"]


def test_the_budget_leaves_out_only_the_cells_it_has_no_room_for(tmp_path):
    def cell(regime, student):
        return paper.Cell(regime, student, "Q", ("ours",), (), {})

    slow, fast, unseen = cell("a", "mobilenetv2"), cell("a", "resnet9"), cell("b", "resnet9")
    for student, seconds in (("mobilenetv2", 200), ("resnet9", 60)):
        recorded = {"cell": f"a-{student}-Q", "regime": "a", "student": student,
                    "runs": {"ours-s0": {"wall_seconds": seconds}}}
        (tmp_path / f"a-{student}-Q.json").write_text(json.dumps(recorded))
    todo = [(slow, "ours", 1), (slow, "ours", 2), (fast, "ours", 1), (unseen, "ours", 1)]
    chunk = paper.Chunk(None, todo, tmp_path, {}, 1, {}, budget_s=100, drop_caches=False, expect_s=90)
    assert chunk.over_budget(slow) and chunk.todo == todo[2:]  # 200 s expected: its runs are left out
    assert not chunk.over_budget(fast)  # 60 s: still started
    assert not chunk.over_budget(unseen)  # no run recorded: --expect-s, 90 s
    chunk.expect_s = None
    assert chunk.over_budget(unseen) and chunk.todo == [todo[2]]  # else the longest of any, 200 s


def _cell(criterion="Q", methods=("ours",), regime="a"):
    return paper.Cell(regime, "resnet9", criterion, tuple(methods), (), {})


def _results(folder, cell, runs, **fields):
    (folder / f"{cell.name}.json").write_text(json.dumps(
        {"cell": cell.name, "regime": cell.regime, "student": cell.student, "runs": runs, **fields}))


def test_the_runs_to_do_are_those_not_recorded_seed_major(tmp_path):
    main, ablation = _cell(methods=("ce", "ours")), _cell("S")
    _results(tmp_path, main, {"ce-s1": {}})
    todo = [(cell.name, method, seed) for cell, method, seed in paper.runs_to_do([main, ablation], [0, 1, 2], tmp_path)]
    assert todo == [("a-resnet9-Q", "ce", 0), ("a-resnet9-Q", "ours", 0), ("a-resnet9-Q", "ours", 1),
                    ("a-resnet9-Q", "ce", 2), ("a-resnet9-Q", "ours", 2),
                    ("a-resnet9-S", "ours", 0), ("a-resnet9-S", "ours", 1), ("a-resnet9-S", "ours", 2)]
    assert [item[0].name for item in paper.runs_to_do([main, ablation], [0], tmp_path, ["a-resnet9-S"])] == [
        "a-resnet9-S"]


def test_a_regimes_cap_lowers_the_runs_at_once_never_raises_them(tmp_path):
    capped, free = _cell(regime="full"), _cell(regime="labels10")
    assert paper.Chunk(None, [], tmp_path, {}, 2, {"full": 4}, float("inf"), False).jobs(capped) == 2
    chunk = paper.Chunk(None, [], tmp_path, {}, 8, {"full": 4}, float("inf"), False)
    assert (chunk.jobs(capped), chunk.jobs(free)) == (4, 8)


def test_an_ablation_run_repeats_only_a_main_run_of_the_same_teacher_and_layers_done_or_asked_for(tmp_path):
    from concurrent.futures import Future

    main, ablation = _cell(methods=("ce", "ours")), _cell("S")
    context = {"teacher_id": "t", "selection": {"layers": [1, 2, 3, 4]}}
    prepared = Future()
    prepared.set_result({"context": context})

    def chunk_asking(*methods):
        chunk = paper.Chunk(None, [(main, m, 0) for m in methods] + [(ablation, "ours", 0)], tmp_path, {}, 1, {},
                            float("inf"), False)
        chunk.prepared[main.name] = prepared
        return chunk

    assert chunk_asking("ce", "ours").twin(ablation, "ours-s0", context) == main.name
    assert chunk_asking("ce").twin(ablation, "ours-s0", context) is None  # Q's run is in no chunk: train it
    assert chunk_asking("ours").twin(ablation, "ours-s0", {**context, "teacher_id": "u"}) is None
    assert chunk_asking("ours").twin(ablation, "ours-s0", {**context, "selection": {"layers": [5]}}) is None
    _results(tmp_path, main, {"ours-s0": {"teacher_id": "t", "teacher_layers": [1, 2, 3, 4], "wall_seconds": 60}})
    assert chunk_asking().twin(ablation, "ours-s0", context) == main.name  # recorded before
    _results(tmp_path, main, {"ours-s0": {"teacher_id": "u", "teacher_layers": [1, 2, 3, 4], "wall_seconds": 60}})
    assert chunk_asking().twin(ablation, "ours-s0", context) is None  # recorded, from another teacher training


def test_a_cell_keeps_every_teacher_training_its_runs_distilled_from(tmp_path):
    from concurrent.futures import Future

    cell, chunk = _cell(), paper.Chunk(None, [], tmp_path, {"params": "p.yaml"}, 1, {}, float("inf"), False)
    for seed, teacher in ((0, "t1"), (1, "t2")):  # e.g. two chunks on two machines, each training its teacher
        chunk.prepared[cell.name] = Future()
        chunk.prepared[cell.name].set_result({"context": {"teacher_id": teacher, "layers": [{"Q": seed}]}})
        chunk.record(cell, f"ours-s{seed}", {"teacher_id": teacher, "test_acc": 0.5})
    saved = json.loads((tmp_path / "a-resnet9-Q.json").read_text())
    assert set(saved["runs"]) == {"ours-s0", "ours-s1"} and saved["teacher_id"] == "t2"  # the latest on top
    assert saved["teachers"] == {"t1": {"teacher_id": "t1", "layers": [{"Q": 0}]},
                                 "t2": {"teacher_id": "t2", "layers": [{"Q": 1}]}}


def test_a_run_needs_at_least_one_job(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        paper.main(["--results", str(tmp_path), "run", "--work", str(tmp_path / "w"), "--jobs", "0"])
    assert stop.value.code == 2 and "not a positive whole number: '0'" in capsys.readouterr().err


def test_table_names_each_teacher_once_and_which_ablation_runs_are_qs(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"params": "p.yaml", "seeds": [0, 1], "regimes": {"a": []}, "students": ["resnet9"],
                                    "methods": ["ours"], "ablation": {"method": "ours", "criteria": ["S"]}}))

    def run(seed, teacher_acc, **extra):
        return {"method": "ours", "seed": seed, "test_acc": 0.9, "best_test_acc": 0.91, "probe_test_acc": 0.89,
                "wall_seconds": 60, "device": "cpu", "jobs": 1, "teacher_test_acc": teacher_acc,
                "teacher_layers": [1, 2, 3, 4], **extra}

    layers = [{"layer": k, "Q": 1.0} for k in range(3)]
    _results(tmp_path, _cell(), {"ours-s0": run(0, 0.93), "ours-s1": run(1, 0.93)}, layers=layers)
    _results(tmp_path, _cell("S"), {"ours-s0": run(0, 0.93, same_run_as="a-resnet9-Q"), "ours-s1": run(1, 0.94)},
             layers=layers)
    text = paper_table.table(tmp_path, grid)
    assert "Teacher test top-1 93.00 % (one value per teacher" in text
    assert "| S | [1, 2, 3, 4] (1 of them Q's runs) | 2 | 90.00 ± 0.00 | 89.00 ± 0.00 | 93.00 / 94.00 |" in text
    assert "| Q | [1, 2, 3, 4] | 2 |" in text


def test_regimes_share_a_teacher_the_next_cell_is_prepared_while_runs_go_and_a_regime_caps_runs(grid, tmp_path):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "params": str(grid / "params.yaml"), "seeds": [2], "students": ["resnet9"], "methods": ["ours"],
        "regimes": {"small": [], "few": ["student.train_subset=150"]}, "ablation": {"method": "ours", "criteria": []},
        "max_jobs": {"small": 1, "few": 1}}, sort_keys=False))
    out = paper_cli(tmp_path, "run", "--work", str(tmp_path / "work"), "--jobs", "2")
    assert "2 runs to do" in out
    # few's scores and cache are started as small's run starts (its teacher is small's), not once its slot is free
    assert out.index("few-resnet9-Q: preparing") < out.index("small-resnet9-Q ours-s2:")
    small, few = (json.loads((tmp_path / f"results/{r}-resnet9-Q.json").read_text()) for r in ("small", "few"))
    assert small["teacher"] == few["teacher"] and small["selection"] == few["selection"]
    work = next((tmp_path / "work").iterdir())
    assert len(list(work.glob("*/teacher/manifest.json"))) == 1  # one teacher trained for both regimes
    for results, images in ((small, 300), (few, 150)):
        run = json.loads((work / f"{results['regime']}/Q/resnet9/ours-s2/student.json").read_text())
        assert run["train_images"] == images
    q, s = small["runs"]["ours-s2"], few["runs"]["ours-s2"]
    assert q["jobs"] == s["jobs"] == 1  # the regime's cap, not --jobs
    assert s["started_s"] >= q["started_s"] + q["wall_seconds"] - 0.2  # one after the other


def test_an_ablation_run_with_the_main_runs_layers_is_recorded_as_that_run_not_trained(grid, tmp_path):
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "params": str(grid / "params.yaml"), "seeds": [0], "students": ["resnet9"], "methods": ["ours"],
        "regimes": {"pinned": ["score.layers=[12,13,14,15]"]}, "ablation": {"method": "ours", "criteria": ["S"]}}))
    out = paper_cli(tmp_path, "run", "--work", str(tmp_path / "work"), "--jobs", "2")
    assert "2 runs to do" in out and out.count("top-1") == 1  # S's run: Q's, recorded, not trained
    assert "pinned-resnet9-S ours-s0: the same teacher layers as pinned-resnet9-Q: its run, not trained again" in out
    results = {c: json.loads((tmp_path / f"results/pinned-resnet9-{c}.json").read_text()) for c in ("Q", "S")}
    main = results["Q"]["runs"]["ours-s0"]
    assert results["S"]["runs"]["ours-s0"] == {**main, "same_run_as": "pinned-resnet9-Q"}
    assert results["S"]["selection"]["criterion"] == "S" and main["teacher_layers"] == [12, 13, 14, 15]
    work = next((tmp_path / "work").iterdir())
    assert not (work / "pinned/S").exists()  # neither its cache nor a student
    assert "| S | [12, 13, 14, 15] (Q's runs) | 1 |" in paper_cli(tmp_path, "table")

    (tmp_path / "results/pinned-resnet9-S.json").unlink()  # now the main run is recorded before the chunk starts
    out = paper_cli(tmp_path, "run", "--work", str(tmp_path / "work"))
    assert "1 runs to do" in out and "not trained again" in out and "top-1" not in out
    assert json.loads((tmp_path / "results/pinned-resnet9-S.json").read_text())["runs"] == results["S"]["runs"]
    assert not (work / "pinned/S").exists()
    cells = paper.load_grid(tmp_path / "grid.yaml")[1]
    assert paper.changed_runs(cells, tmp_path / "results", grid / "params.yaml", []) == []  # checked as Q's run

    main["teacher_id"] = "another training"  # Q's run distilled another teacher than this work folder's
    (tmp_path / "results/pinned-resnet9-Q.json").write_text(json.dumps({**results["Q"], "runs": {"ours-s0": main}}))
    (tmp_path / "results/pinned-resnet9-S.json").unlink()
    out = paper_cli(tmp_path, "run", "--work", str(tmp_path / "work"))
    assert "1 runs to do" in out and "not trained again" not in out and "pinned-resnet9-S ours-s0: top-1" in out
    assert "same_run_as" not in json.loads((tmp_path / "results/pinned-resnet9-S.json").read_text())["runs"]["ours-s0"]


def test_results_of_another_variant_are_not_taken_for_done_runs(grid):
    cmd = [sys.executable, str(ROOT / "experiments/paper.py"), "--grid", str(grid / "grid.yaml"), "--results",
           str(grid / "results"), "run", "--work", str(grid / "work"), "-S", "student.train.epochs=3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "small-resnet9-Q.json holds runs of params" in result.stderr and "own --results folder" in result.stderr
    where = paper_cli(grid, "run", "--work", str(grid / "work"), "-S", f"prepare.root={grid / 'elsewhere'}")
    assert "0 runs to do" in where  # where the data lie is no variant


def test_runs_recorded_with_other_params_than_the_grid_gives_now_are_refused(grid, tmp_path):
    shutil.copytree(grid / "results", tmp_path / "results")
    edited = {**yaml.safe_load((grid / "grid.yaml").read_text()), "method_overrides": {"ce": ["student.train.lr=0.02"]}}
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(edited))
    cmd = [sys.executable, str(ROOT / "experiments/paper.py"), "--grid", str(tmp_path / "grid.yaml"), "--results",
           str(tmp_path / "results"), "run", "--work", str(tmp_path / "work")]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: 2 recorded runs were made with other params than the grid gives them "
                                    "now (e.g. small-resnet9-Q ce-s0)")
    assert not (tmp_path / "work").exists()

    def changed(**grid_edits):
        (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**edited, **grid_edits}))
        return paper.changed_runs(paper.load_grid(tmp_path / "grid.yaml")[1], tmp_path / "results",
                                  grid / "params.yaml", [])

    assert changed(method_overrides={"ours": ["student.feature_weight=1.0"]}) == []  # the default: the same params
    assert changed(method_overrides={}, regimes={"small": ["teacher.train.epochs=2"]}) == [  # another teacher
        "small-resnet9-Q ce-s0", "small-resnet9-Q ce-s1", "small-resnet9-Q ours-s0", "small-resnet9-Q ours-s1",
        "small-resnet9-S ours-s0", "small-resnet9-S ours-s1"]
    assert changed(method_overrides={"ce": ["probe.holdout=0.2"]}) == ["small-resnet9-Q ce-s0", "small-resnet9-Q ce-s1"]
    assert len(changed(method_overrides={}, regimes={"small": ["score.subset_a=90"]})) == 6
    assert changed(method_overrides={}, regimes={"small": ["prepare.cache_dir=elsewhere"]}) == []  # where, not what


def test_failed_runs_leave_the_others_recorded_and_exit_1(grid, tmp_path):
    """Cells whose scores fail, a run whose params fail and the ablation run that was to be it: every other run is
    still trained and recorded."""
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "params": str(grid / "params.yaml"), "seeds": [3], "students": ["resnet9"], "methods": ["ce", "ours"],
        "regimes": {"bad": ["score.layers=[40,41,42,43]"], "small": ["score.layers=[12,13,14,15]"]},
        "ablation": {"method": "ours", "criteria": ["S"]}, "method_overrides": {"ours": ["student.train.lr=-1"]}},
        sort_keys=False))
    cmd = [sys.executable, str(ROOT / "experiments/paper.py"), "--grid", str(tmp_path / "grid.yaml"), "--results",
           str(tmp_path / "results"), "run", "--work", str(tmp_path / "work"), "--jobs", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    failed = result.stderr.splitlines()
    assert failed[0] == "4 failed (the other runs are recorded):"
    assert failed[1].startswith("  bad-resnet9-Q ce-s3, ours-s3: score -> ") and "out of range" in failed[1]
    assert failed[2].startswith("  bad-resnet9-S ours-s3: score -> ") and "out of range" in failed[2]
    assert failed[3].startswith("  small-resnet9-Q ours-s3: student -> ") and "student.train.lr" in failed[3]
    assert failed[4] == failed[3].replace("-Q", "-S", 1)  # S's run, the same as Q's, fails with it
    assert not (tmp_path / "results/bad-resnet9-Q.json").exists()
    assert not (tmp_path / "results/small-resnet9-S.json").exists()
    assert set(json.loads((tmp_path / "results/small-resnet9-Q.json").read_text())["runs"]) == {"ce-s3"}


GOOD_GRID = {"params": "profiles/gpu.yaml", "seeds": [0], "regimes": {"a": []}, "students": ["resnet9"],
             "methods": ["ours"], "ablation": {"method": "ours", "criteria": ["S"]}}


@pytest.mark.parametrize("grid_text, message", [
    ("seeds: [0", "is not valid YAML (ParserError)"),
    ("[1, 2]", "missing ablation, methods, params, regimes, seeds, students"),
    (yaml.safe_dump({**GOOD_GRID, "seeds": [0, 0]}), "seeds names an item twice"),
    (yaml.safe_dump({**GOOD_GRID, "methods": "ours"}), "methods must be a list"),
    (yaml.safe_dump({**GOOD_GRID, "regimes": ["a"]}), "regimes must be a mapping"),
    (yaml.safe_dump({**GOOD_GRID, "ablation": {"method": "ours", "criteria": ["Q"]}}), "ablation.criteria holds Q"),
    (yaml.safe_dump({**GOOD_GRID, "params": "missing.yaml"}), "params file /"),
])
def test_a_malformed_grid_is_refused_in_one_line_before_any_work(tmp_path, capsys, grid_text, message):
    (tmp_path / "grid.yaml").write_text(grid_text)
    code = paper.main(["--grid", str(tmp_path / "grid.yaml"), "--results", str(tmp_path / "results"), "run",
                       "--work", str(tmp_path / "work")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "work").exists()


def test_a_results_folder_holding_other_json_is_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "results").mkdir()
    (tmp_path / "results/notes.json").write_text('{"runs": {}}')
    assert paper.main(["--results", str(tmp_path / "results"), "table"]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'results/notes.json'} is not a results file of paper.py\n"


def test_a_stage_output_that_failed_is_not_tried_again_by_the_next_cell(tmp_path, monkeypatch):
    runner = paper.Runner(ROOT / "params.yaml", tmp_path / "work", [], 1)
    stages, run = [], subprocess.run

    def counted(cmd, **kwargs):
        stages.append(cmd[3])
        return run(cmd, **kwargs)

    monkeypatch.setattr(paper.subprocess, "run", counted)
    errors = []
    for _ in range(2):  # e.g. two cells sharing one teacher
        with pytest.raises(paper.StageFailed, match="teacher.train.lr") as err:
            runner.kd("teacher", ["teacher.train.lr=-1"], runner.root / "teacher", "--data", str(tmp_path))
        errors.append(str(err.value))
    assert stages == ["teacher"] and errors[0] == errors[1]


def test_the_q_chart_draws_each_teacher_training_of_a_cell():
    def layers(q):
        return [{"layer": float(i), "Q": value} for i, value in enumerate(q)]

    cell = {"regime": "r", "layers": layers([1.0, 2.0]), "teachers": {"a": {"layers": layers([1.0, 2.0])},
                                                                      "b": {"layers": layers([1.5, 2.5])}}}
    chart = paper_table.q_chart(cell).splitlines()
    assert chart[2:] == ['  title "Q per teacher layer (r; 2 teachers)"', "  x-axis [0, 1]", '  y-axis "Q"',
                         "  line [1.0, 2.0]", "  line [1.5, 2.5]", "```"]
    del cell["teachers"]  # recorded before runs named their teacher
    assert paper_table.q_chart(cell).splitlines()[2:5] == ['  title "Q per teacher layer (r)"', "  x-axis [0, 1]",
                                                      '  y-axis "Q"']


def test_a_mistyped_cell_is_refused_not_skipped(grid):
    cmd = [sys.executable, str(ROOT / "experiments/paper.py"), "--grid", str(grid / "grid.yaml"), "--results",
           str(grid / "results"), "run", "--work", str(grid / "work"), "--cells", "small-resnet9-Q", "small-resnet-S"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: unknown cells ['small-resnet-S']: `paper.py plan` lists them")


def test_table_shows_means_over_seeds_and_replaces_its_section(grid):
    runs = json.loads((grid / "results/small-resnet9-Q.json").read_text())["runs"]
    ours = [runs["ours-s0"]["test_acc"], runs["ours-s1"]["test_acc"]]
    mean, std = sum(ours) / 2, abs(ours[0] - ours[1]) / 2 ** 0.5
    ablation_path = grid / "results/small-resnet9-S.json"
    ablation = json.loads(ablation_path.read_text())
    del ablation["runs"]["ours-s1"]  # one seed: no spread to show
    ablation_path.write_text(json.dumps(ablation))
    only = ablation["runs"]["ours-s0"]
    doc = grid / "RESULTS.md"
    doc.write_text("# Results\n\nintro\n")
    text = paper_cli(grid, "table", "--write", str(doc))
    assert f"| ours | 2 | {100 * mean:.2f} ± {100 * std:.2f} |" in text
    assert (f"| S | {only['teacher_layers']} | 1 | {100 * only['test_acc']:.2f} | "
            f"{100 * only['probe_test_acc']:.2f} | {100 * only['teacher_test_acc']:.2f} |") in text
    assert "| Q | " in text and "xychart-beta" in text
    paper_cli(grid, "table", "--write", str(doc))
    written = doc.read_text()
    assert written.startswith("# Results\n\nintro\n") and written.count(paper_table.BEGIN) == 1
    assert text in written


def test_plan_and_queue_cover_the_whole_grid():
    grid, cells = paper.load_grid()
    assert len(cells) == len(grid["regimes"]) * len(grid["students"]) * (1 + len(grid["ablation"]["criteria"]))
    main_cells = len(grid["regimes"]) * len(grid["students"])
    assert sum(len(c.methods) for c in cells if c.criterion == "Q") == main_cells * len(grid["methods"])
    commands = paper.queue_commands()
    assert len(commands) == len(cells) + main_cells  # ce has its own learning rate: its own experiment per main cell
    assert commands[0].startswith("dvc exp run --queue -n labels10-resnet9-Q ")
    assert "-S 'prepare.train_subset=6000'" in commands[0] and "-S 'seeds=[0,1,2]'" in commands[0]
    assert "-S 'student.train.lr=0.05'" in commands[0]
    assert "-S 'methods=[vkd,vkd_std,base_fkd,stl_seplin,ours,ours_ce,ours_kl]'" in commands[0]
    assert commands[1].startswith("dvc exp run --queue -n labels10-resnet9-Q-ce ")
    assert "-S 'methods=[ce]'" in commands[1] and "lr=0.01" in commands[1] and "lr=0.05" not in commands[1]
    from pipeline.config import load_params

    for cell in cells:  # every run's overrides are valid params, with the paper's learning rates
        for method in cell.methods:
            params = load_params(ROOT / grid["params"], cell.run_overrides(method, 0))
            assert params.student.train.lr == (0.01 if method == "ce" else 0.05)
            assert params.student.method == method and params.score.criterion == cell.criterion


def test_a_bad_grid_file_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "grid.yaml").write_text("params: profiles/gpu.yaml\nseeds: [0]\n")
    for grid, message in ((tmp_path / "grid.yaml", "missing ablation, methods, regimes, students"),
                          (tmp_path / "absent.yaml", "grid file not found")):
        result = subprocess.run([sys.executable, str(ROOT / "experiments/paper.py"), "--grid", str(grid), "plan"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_a_teacher_sent_back_in_parts_is_restored_by_the_next_session_not_trained(grid, tmp_path, capsys):
    import teacher_bank

    calls = [tmp_path / f"out{i}" for i in (1, 2, 3)]
    for out in calls:
        out.mkdir()
    first, left = teacher_bank.send(grid / "work", calls[0], 10**9, max_files=3, part_bytes=50_000)
    assert len(first) == 3 and left > 0  # what comes back per call is limited: the rest on the next call
    second, left = teacher_bank.send(grid / "work", calls[1], 10**9, max_files=99, part_bytes=50_000)
    assert left == 0 and not set(first) & set(second)
    assert len(first) + len(second) == int(teacher_bank.PART.fullmatch(first[0])["n"])
    assert teacher_bank.send(grid / "work", calls[2], 10**9, 99, only={1}) == ([first[1]], 0)  # asked for again
    room = teacher_bank.send(grid / "work", calls[2], 75_000, 99, only={0, 1, 2})  # room for one 50 kB part
    assert room == ([first[0]], 2)
    bank = tmp_path / "bank"
    teacher_bank.collect(calls[:2], bank)
    ((ident, sha),) = teacher_bank.part_sets(bank)
    capsys.readouterr()
    teacher_bank.collect(calls[:2], bank)  # the same training again: nothing to say against it
    assert "not collected" not in capsys.readouterr().out
    (calls[2] / f"teacher-{ident}.{'1' * 12}.00-of-01.part").write_bytes(b"another training of the same teacher")
    teacher_bank.collect(calls[2:], bank)
    assert list(teacher_bank.part_sets(bank)) == [(ident, sha)]  # one training per teacher: no doubt which
    other_bank = tmp_path / "other-bank"  # holding a complete set that does not join to its checksum
    other_bank.mkdir()
    (other_bank / f"teacher-{ident}.{'2' * 12}.00-of-01.part").write_bytes(b"a copy cut short")
    teacher_bank.collect(calls[:2], other_bank)
    assert f"teacher-{ident} ({'2' * 12}): 1 parts, 0.0 MiB; CORRUPT" in capsys.readouterr().out
    assert set(teacher_bank.part_sets(other_bank)) == {(ident, "2" * 12), (ident, sha)}  # it did not block this one
    (bank / f"teacher-{ident}.{'0' * 12}.00-of-02.part").write_bytes(b"half of another training's teacher")

    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({  # the same teacher params and data as `grid`'s cells
        "params": str(grid / "params.yaml"), "seeds": [3], "students": ["resnet9"], "methods": ["ours"],
        "regimes": {"small": []}, "ablation": {"method": "ours", "criteria": []}}))
    moved = tmp_path / "moved-data"  # the data elsewhere: the same data, so the same teacher
    shutil.copytree(SMALL["prepare"]["root"], moved)
    out = paper_cli(tmp_path, "run", "--work", str(tmp_path / "fresh"), "--teacher-bank", str(bank),
                    "-S", f"prepare.root={moved}")
    assert f"small-resnet9-Q: teacher {ident} restored from {bank}, not trained" in out and "top-1" in out
    shared = next((tmp_path / "fresh").glob("*/teacher-*"))
    assert not (shared / "teacher.log").exists()  # the teacher stage did not run
    assert len(list((grid / "work").glob("*/teacher-*"))) == 1
    original = next((grid / "work").glob("*/teacher-*"))
    assert (shared / "teacher/model.pt").read_bytes() == (original / "teacher/model.pt").read_bytes()
    restored = json.loads((tmp_path / "results/small-resnet9-Q.json").read_text())
    before = json.loads((grid / "results/small-resnet9-Q.json").read_text())
    assert restored["teacher"] == before["teacher"]
    assert restored["runs"]["ours-s3"]["teacher_id"] == before["runs"]["ours-s0"]["teacher_id"]
    assert list(restored["teachers"]) == list(before["teachers"]) == [before["runs"]["ours-s0"]["teacher_id"]]
    assert teacher_bank.send(tmp_path / "fresh", calls[2], 10**9, 99) == ([], 0)  # a restored teacher stays

    staged = sorted((grid / "work.parts").glob("*.part"))
    staged[-1].unlink()  # a packing cut short is made again, not sent incomplete
    assert teacher_bank.pack(original, grid / "work.parts", 50_000) == staged and staged[-1].is_file()
    misnamed = tmp_path / "misnamed-bank"  # intact parts whose name says another training than their teacher's
    misnamed.mkdir()
    for part in teacher_bank.part_sets(bank)[(ident, sha)]:
        shutil.copy(part, misnamed / part.name.replace(ident, "f" * 16))
    assert not teacher_bank.restore(misnamed, "f" * 16, tmp_path / "y") and not (tmp_path / "y/teacher").exists()
    parts = teacher_bank.part_sets(bank)[(ident, sha)]
    damaged = bytearray(parts[1].read_bytes())
    damaged[100] ^= 1
    parts[1].write_bytes(bytes(damaged))
    assert not teacher_bank.restore(bank, ident, tmp_path / "x")  # the checksum in the names refuses it
    parts[1].unlink()
    assert not teacher_bank.restore(bank, ident, tmp_path / "x") and not (tmp_path / "x").exists()  # incomplete

"""Typed params (pipeline/config.py) and the command line's handling of them."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from pipeline.config import load_params
from pipeline.errors import InputError
from stages.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def write(tmp_path, text, name="params.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_without_a_file():
    p = load_params(None)
    assert p.seed == 0
    assert p.prepare.source == "fashion-mnist" and p.prepare.root is None
    assert p.prepare.cache_dir == "data/download" and p.prepare.image_size == 32
    assert p.prepare.resize_mode == "pad" and p.prepare.channels is None
    assert p.prepare.train_subset is None and p.prepare.test_subset is None and p.prepare.test_fraction == 0.2
    m, t = p.teacher.model, p.teacher.train
    assert m.arch == "resnet34" and m.width == 1.0 and m.pretrained is False and m.timm_kwargs == {}
    assert t.recipe == "adamw_onecycle" and t.epochs == 50 and t.batch_size == 128
    assert t.lr == 0.01 and t.weight_decay == 0.01 and t.milestones == [150, 180, 210] and t.gamma == 0.1
    assert t.augment is False and t.eval_batch_size == 1024
    assert p.teacher.checkpoint is None and p.teacher.device == "auto"


def test_empty_file_and_partial_sections_keep_defaults(tmp_path):
    assert load_params(write(tmp_path, "")) == load_params(None)
    p = load_params(write(tmp_path, "prepare:\n  image_size: 28\nteacher:\n  train:\n    epochs: 3\n"))
    assert p.prepare.image_size == 28 and p.prepare.source == "fashion-mnist" and p.prepare.resize_mode == "pad"
    assert p.teacher.train.epochs == 3 and p.teacher.train.batch_size == 128 and p.teacher.model.arch == "resnet34"


def test_repository_params_file_validates_and_round_trips():
    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    dumped = load_params(REPO / "params.yaml").model_dump()

    def check(node, values, where):
        for key, value in node.items():
            if isinstance(value, dict):
                check(value, values[key], f"{where}{key}.")
            else:
                assert values[key] == value, f"{where}{key}"

    check(tree, dumped, "")


def test_params_are_frozen():
    p = load_params(None)
    with pytest.raises(ValidationError):
        p.prepare.image_size = 64


# --- overrides ---------------------------------------------------------------------------------


def test_overrides_dotted_keys_yaml_typed(tmp_path):
    path = write(tmp_path, "seed: 3\nprepare:\n  root: /data/x\n  image_size: 28\nteacher:\n  model:\n"
                           "    arch: resnet9\n")
    p = load_params(path, ["seed=7", "prepare.channels=3", "prepare.root=null", "prepare.train_subset=500",
                           "teacher.train.milestones=[10, 20]", "teacher.train.augment=true",
                           "teacher.train.lr=0.5", "teacher.model.timm_kwargs={drop_rate: 0.1, global_pool: avg}",
                           "teacher.checkpoint=models/t.pt", "teacher.model.width = 0.25"])
    assert p.seed == 7 and p.prepare.channels == 3 and p.prepare.root is None
    assert p.prepare.train_subset == 500 and p.prepare.image_size == 28  # file value kept where not overridden
    assert p.teacher.train.milestones == [10, 20] and p.teacher.train.augment is True
    assert p.teacher.train.lr == 0.5 and p.teacher.model.width == 0.25 and p.teacher.model.arch == "resnet9"
    assert p.teacher.model.timm_kwargs == {"drop_rate": 0.1, "global_pool": "avg"}
    assert p.teacher.checkpoint == "models/t.pt"


def test_overrides_apply_in_order_and_quote_strings():
    p = load_params(None, ["seed=1", "seed=2", "prepare.root='123'", "prepare.cache_dir=a=b"])
    assert p.seed == 2
    assert p.prepare.root == "123"  # quoted: a string, not the int 123
    assert p.prepare.cache_dir == "a=b"  # only the first '=' splits


def test_numbers_in_exponent_form_and_booleans_where_booleans_belong():  # YAML reads 1e-3 as a string
    p = load_params(None, ["student.train.lr=1e-3", "teacher.train.augment=true", "student.train.epochs='7'"])
    assert (p.student.train.lr, p.teacher.train.augment, p.student.train.epochs) == (0.001, True, 7)


def test_override_new_section_on_defaults():
    p = load_params(None, ["teacher.train.epochs=2", "prepare.source=cifar10"])
    assert p.teacher.train.epochs == 2 and p.teacher.train.batch_size == 128 and p.prepare.source == "cifar10"


def test_override_one_model_key_on_defaults():
    p = load_params(None, ["teacher.model.width=0.5"])
    assert p.teacher.model.arch == "resnet34" and p.teacher.model.width == 0.5


@pytest.mark.parametrize("item", ["seed", "prepare.root", "=5", ""])
def test_override_without_key_value(item):
    with pytest.raises(InputError, match="is not key=value"):
        load_params(None, [item])


@pytest.mark.parametrize("item", [".seed=1", "teacher..train=1", "teacher.=1"])
def test_override_with_an_empty_part_is_named(item):
    with pytest.raises(InputError) as err:
        load_params(None, [item])
    assert str(err.value) == f"override {item.partition('=')[0]!r}: an empty part in the dotted key"


def test_override_into_a_scalar(tmp_path):
    with pytest.raises(InputError, match="override seed.x: seed is not a section"):
        load_params(write(tmp_path, "seed: 3\n"), ["seed.x=1"])


@pytest.mark.parametrize("item", ["prepare.root=[unclosed", "prepare.root=a: b: c"])
def test_override_value_not_yaml(item):
    with pytest.raises(InputError, match="prepare.root"):
        load_params(None, [item])


# --- validation errors -------------------------------------------------------------------------


@pytest.mark.parametrize("text, overrides, message", [
    ("bogus: 1\n", [], "params: bogus: unknown key"),
    ("prepare:\n  rooot: /x\n", [], "params: prepare.rooot: unknown key"),
    ("teacher:\n  model:\n    arch: resnet9\n    depth: 3\n", [], "params: teacher.model.depth: unknown key"),
    ("teacher:\n  model:\n    arch: resnet9\n", ["teacher.train.epoch=3"], "params: teacher.train.epoch: unknown key"),
    ("", ["teacher.nested.deeper.key=1"], "params: teacher.nested: unknown key"),
])
def test_unknown_key_is_named(tmp_path, text, overrides, message):
    with pytest.raises(InputError) as err:
        load_params(write(tmp_path, text), overrides)
    assert str(err.value) == message


def test_several_errors_are_counted_in_one_line(tmp_path):
    with pytest.raises(InputError) as err:
        load_params(write(tmp_path, "bogus: 1\nprepare:\n  also_bogus: 2\n  image_size: x\n"))
    message = str(err.value)
    assert message.startswith("params: ") and message.endswith("(and 2 more)") and "\n" not in message


def test_a_typo_is_named_before_the_errors_it_explains(tmp_path):
    with pytest.raises(InputError) as err:
        load_params(write(tmp_path, "prepare:\n  image_size: x\n  rooot: 1\n"))
    assert str(err.value) == "params: prepare.rooot: unknown key (and 1 more)"


@pytest.mark.parametrize("text, message", [
    ("prepare:\n  image_size: big\n", "params: prepare.image_size: Input should be a valid integer"),
    ("prepare:\n  image_size: 4\n", "params: prepare.image_size: Input should be greater than or equal to 8"),
    ("prepare:\n  resize_mode: crop\n", "params: prepare.resize_mode: Input should be 'pad' or 'resize'"),
    ("prepare:\n  channels: 2\n", "params: prepare.channels: Input should be 1 or 3"),
    ("prepare:\n  source: svhn\n", "params: prepare.source: Input should be"),
    ("prepare:\n  test_fraction: 1.0\n", "params: prepare.test_fraction: Input should be less than 1"),
    ("prepare:\n  train_subset: 0\n", "params: prepare.train_subset: Input should be greater than 0"),
    ("score:\n  subset_b_per_class: 1\n", "params: score.subset_b_per_class: Input should be greater than or equal to 2"),
    ("teacher:\n  train:\n    epochs: -1\n", "params: teacher.train.epochs: Input should be greater than 0"),
    ("teacher:\n  train:\n    milestones: 5\n", "params: teacher.train.milestones: Input should be a valid list"),
    ("teacher:\n  device: tpu\n", "params: teacher.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ("seed: 1.5\n", "params: seed: Input should be a valid integer"),
    ("student:\n  model:\n    arch: resnet99\n", "params: student.model.arch: unknown arch 'resnet99': choose one of"),
    ("teacher:\n  model:\n    arch: 'timm:'\n", "params: teacher.model.arch: unknown arch 'timm:'"),
    ("student:\n  teacher_layers: [3, -2]\n", "params: student.teacher_layers.1: Input should be greater than or"),
    ("export:\n  batch_sizes: []\n", "params: export.batch_sizes: List should have at least 1 item"),
    ("probe:\n  weight_decays: []\n", "params: probe.weight_decays: List should have at least 1 item"),
    ("probe:\n  weight_decays: [-1.0]\n", "params: probe.weight_decays.0: Input should be greater than or"),
    ("prepare: 5\n", "params: prepare: Input should be a valid dictionary"),
    ("seed: -1\n", "params: seed: Input should be greater than or equal to 0"),
    ("seeds: [0, 4294967296]\n", "params: seeds.1: Input should be less than or equal to 4294967295"),
    ("seeds: [0, 1, 0]\n", "params: seeds: 0 listed twice: each run is trained once"),
    ("methods: [ours, ce, ours]\n", "params: methods: ours listed twice: each run is trained once"),
    ("export:\n  opset: 17\n", "params: export.opset: Input should be greater than or equal to 18"),
    ("teacher:\n  train:\n    epochs: true\n", "params: teacher.train.epochs: true (a boolean) is not valid here"),
    ("prepare:\n  channels: true\n", "params: prepare.channels: true (a boolean) is not valid here"),
    ("student:\n  model:\n    width: yes\n", "params: student.model.width: true (a boolean) is not valid here"),
    ("seeds: [true]\n", "params: seeds: true (a boolean) is not valid here"),  # not seed 1
    ("student:\n  teacher_layers: [3, false]\n", "params: student.teacher_layers: false (a boolean) is not valid"),
    ("probe:\n  weight_decays: [0.1, yes]\n", "params: probe.weight_decays: true (a boolean) is not valid here"),
    ("student:\n  train:\n    lr: .inf\n", "params: student.train.lr: Input should be a finite number"),
    ("export:\n  atol: .nan\n", "params: export.atol: Input should be a finite number"),
    ("student:\n  kl_tau: 1e999\n", "params: student.kl_tau: Input should be a finite number"),
])
def test_wrong_type(tmp_path, text, message):
    with pytest.raises(InputError) as err:
        load_params(write(tmp_path, text))
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_missing_file_not_a_mapping(tmp_path):
    with pytest.raises(InputError, match=r"params file .*bad\.yaml is not valid YAML") as err:
        load_params(write(tmp_path, "prepare: [unclosed\n  root: x\n", "bad.yaml"))
    assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"params file not found: .*nope\.yaml"):
        load_params(tmp_path / "nope.yaml")
    for text in ("- a\n- b\n", "[]\n", "false\n", "0\n"):  # falsy ones too: not the defaults
        with pytest.raises(InputError, match="must hold a mapping of sections"):
            load_params(write(tmp_path, text, "list.yaml"))
    assert load_params(write(tmp_path, "", "empty.yaml")) == load_params(None)
    with pytest.raises(InputError, match=r"tab\.yaml is not valid YAML at line 2, column 1: found character '\\t'"):
        load_params(write(tmp_path, "teacher:\n\tdevice: cpu\n", "tab.yaml"))
    with pytest.raises(InputError, match=r"twice\.yaml is not valid YAML at line 4, column 5: key 'epochs' given twice"):
        load_params(write(tmp_path, "teacher:\n  train:\n    epochs: 5\n    epochs: 50\n", "twice.yaml"))
    with pytest.raises(InputError, match=r"key\.yaml is not valid YAML at line 2, column 5: found unhashable key"):
        load_params(write(tmp_path, "teacher:\n  ? [a, b]\n  : 1\n", "key.yaml"))
    with pytest.raises(InputError, match=r"deep\.yaml cannot be read: RecursionError$"):
        load_params(write(tmp_path, "a:\n" + "".join("  " * i + "b:\n" for i in range(1, 2000)), "deep.yaml"))
    with pytest.raises(InputError, match=r"long\.yaml cannot be read: ValueError$"):  # past int's 4300 digits
        load_params(write(tmp_path, "seed: 1" + "0" * 5000 + "\n", "long.yaml"))
    merged = load_params(write(tmp_path, "teacher:\n  train:\n    <<: {epochs: 2, lr: 0.5}\n    lr: 0.02\n", "m.yaml"))
    assert (merged.teacher.train.epochs, merged.teacher.train.lr) == (2, 0.02)  # YAML merge keys, given keys first
    (tmp_path / "latin1.yaml").write_bytes("seed: 0 # café\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1\.yaml is not UTF-8 text"):
        load_params(tmp_path / "latin1.yaml")


# --- through the command line --------------------------------------------------------------------


def one_line_error(result):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("command", ["prepare", "teacher", "score", "cache", "student", "probe", "evaluate", "export"])
def test_cli_bad_params_file(tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    out = ["--metrics", "out"] if command == "evaluate" else ["--out", "out"]
    write(tmp_path, "prepare: [unclosed\n", "bad.yaml")
    line = one_line_error(runner.invoke(app, [command, "-p", "bad.yaml", *out]))
    assert line.startswith("error: params file bad.yaml is not valid YAML")
    write(tmp_path, "teacher:\n  train:\n    epochz: 3\n", "typo.yaml")
    line = one_line_error(runner.invoke(app, [command, "--params", "typo.yaml", *out]))
    assert line == "error: params: teacher.train.epochz: unknown key"
    line = one_line_error(runner.invoke(app, [command, "-p", "missing.yaml", *out]))
    assert line == "error: params file not found: missing.yaml"
    line = one_line_error(runner.invoke(app, [command, "-p", "typo.yaml", "-S", "seed", *out]))
    assert line == "error: override 'seed' is not key=value"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml", "typo.yaml"]  # nothing written


@pytest.mark.parametrize("args, message", [
    (["student", "--epochs", "3"], "error: No such option: --epochs (see `kd student --help`)"),
    (["predict"], "error: Missing argument 'inputs'. (see `kd predict --help`)"),
    (["predict", "x", "--top-k", "0"], "error: Invalid value for '--top-k': Input should be greater than or equal to"),
    (["nosuch"], "error: No such command 'nosuch'. (see `kd --help`)"),
])
def test_cli_usage_errors_are_one_line(args, message):
    assert one_line_error(runner.invoke(app, args)).startswith(message)


def test_cli_default_params_file_is_params_yaml_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(runner.invoke(app, ["prepare", "--out", "out"]))
    assert line == "error: params file not found: params.yaml"


def test_cli_override_value_not_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "seed: 0\n")
    line = one_line_error(runner.invoke(app, ["prepare", "-S", "prepare.root=[x", "--out", "out"]))
    assert line == "error: override 'prepare.root=[x': the value is not valid YAML"


def mentions(help_text: str, option: str) -> bool:
    """`option` as a whole word of the help (`-p` is not found inside `--params`)."""
    return re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text) is not None


def test_importing_the_cli_does_not_import_torch():
    code = ("import sys, stages.cli, pipeline.config, pipeline.sources, pipeline.prepare\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert 'torchvision' not in sys.modules, 'torchvision imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


HELP_ENV = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def command_options():
    """Every sub-command of `kd` with the option strings click knows for it."""
    group = typer.main.get_command(app)
    return {name: [opt for param in cmd.params for opt in (*param.opts, *param.secondary_opts)]
            for name, cmd in group.commands.items()}


def test_kd_help_lists_commands():
    result = runner.invoke(app, ["--help"], env=HELP_ENV)
    assert result.exit_code == 0
    for word in ("prepare", "teacher", "--help", "Logit-free feature knowledge distillation", *command_options()):
        assert word in result.output, word


def test_every_command_help_mentions_all_its_options():
    commands = command_options()
    assert set(commands) == {"prepare", "teacher", "score", "cache", "student", "probe", "evaluate", "export",
                             "predict", "params"}
    for name, options in commands.items():
        result = runner.invoke(app, [name, "--help"], env=HELP_ENV)
        assert result.exit_code == 0, (name, result.output)
        if name != "predict":  # it reads no params file
            assert "--params" in options and "--set" in options, name
        for option in options:
            assert mentions(result.output, option), (name, option)


@pytest.mark.parametrize("command, options", [
    ("prepare", ["--params", "-p", "--set", "-S", "--out", "--help"]),
    ("teacher", ["--params", "-p", "--set", "-S", "--data", "--out", "--metrics", "--live-dir", "--resume-dir",
                 "--help"]),
])
def test_command_help_mentions_every_option(command, options):
    result = runner.invoke(app, [command, "--help"], env=HELP_ENV)
    assert result.exit_code == 0, result.output
    for option in options:
        assert mentions(result.output, option), option
    assert "params file" in result.output and "override a param" in result.output


def test_kd_console_script_help():
    kd = Path(sys.executable).parent / "kd"
    assert kd.is_file(), "the project's console script `kd` is not installed beside this python"
    done = subprocess.run([str(kd), "prepare", "--help"], capture_output=True, text=True, timeout=60,
                          env={"PATH": str(kd.parent), "COLUMNS": "200"})
    assert done.returncode == 0, done.stderr
    assert "--params" in done.stdout and "--out" in done.stdout and "--set" in done.stdout


def test_params_command_lists_every_key_with_its_real_default():
    result = runner.invoke(app, ["params", "student"])
    assert result.exit_code == 0
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "0.05" in lines["student.train.lr"]  # the section's default, not RecipeParams' 0.01
    assert load_params(None, ["student.train.epochs=3"]).student.train.lr == 0.05  # also when train is given in part
    assert "'ours'" in lines["student.method"] and "loss composition" in lines["student.method"]
    assert all(key.startswith("student.") for key in lines)
    bad = runner.invoke(app, ["params", "nope"])
    assert bad.exit_code == 2 and "no params key or section 'nope'" in bad.output


def test_params_command_shows_a_params_files_values(tmp_path):
    write(tmp_path, "teacher:\n  train:\n    epochs: 4\n")
    result = runner.invoke(app, ["params", "teacher.train", "-p", str(tmp_path / "params.yaml"), "-S",
                                 "teacher.train.lr=0.2"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line.split()[1] for line in result.output.splitlines()}
    assert lines["teacher.train.epochs"] == "4" and lines["teacher.train.lr"] == "0.2"  # the file's, the override's
    assert lines["teacher.train.batch_size"] == "128" and all(k.startswith("teacher.train.") for k in lines)
    write(tmp_path, "teacher:\n  train:\n    epochz: 4\n")
    assert one_line_error(runner.invoke(app, ["params", "-p", str(tmp_path / "params.yaml")])) == (
        "error: params: teacher.train.epochz: unknown key")


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "profiles").glob("*.yaml")))
def test_every_params_profile_is_valid(path):
    params = load_params(path)
    assert params.student.train.epochs == 50 and params.teacher.model.width == 1.0  # the paper's recipe


def test_progress_without_a_terminal_prints_lines_within_long_epochs(capsys, monkeypatch):
    from stages.common import EpochProgress, TaskProgress

    monkeypatch.setattr(EpochProgress, "every_s", 0.0)  # a line at every step
    with EpochProgress("teacher", 2) as progress:
        progress.epoch_start(0, 3)
        for _ in range(3):
            progress.step(16)
        progress.epoch_end({"epoch": 1, "train_loss": 0.5, "train_acc": 0.8, "test_acc": 0.7, "img_per_s": 100.0})
    lines = capsys.readouterr().err.splitlines()
    for k, line in enumerate(lines[:3], 1):
        assert re.fullmatch(rf"teacher epoch 1/2  step {k}/3  [\d,]+ img/s", line), line
    assert lines[3].startswith("teacher epoch 1/2  loss 0.5000")
    monkeypatch.setattr(TaskProgress, "every_s", 3600.0)  # quiet until a line is due
    with TaskProgress("cache", 10) as progress:
        progress.advance(5)
    assert capsys.readouterr().err.startswith("cache: 5 img at ")  # the summary line alone

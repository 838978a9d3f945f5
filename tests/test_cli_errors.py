"""Every lrkit subcommand takes options spelled in full and refuses a bad command line in one line, exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LORA_YAML = str(ROOT / "configs" / "train" / "lora.yaml")


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """`lrkit ARGV` in this process: its exit code and its stderr lines."""
    from lrkit.cli import main

    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    return code, capsys.readouterr().err.splitlines()


@pytest.mark.parametrize("argv, given, meant", [
    (["train", "--config", LORA_YAML, "--data.photos", "/no/such/photos", "--max_step", "10"],
     "--max_step", "--max_steps"),
    (["generate", "--concept", "/no/such/concept", "--prompt", "a {}", "--seed", "3"], "--seed", "--seeds"),
    (["eval", "--concept", "/no/such/concept", "--out", "/no/such/out"], "--concept", "--concepts"),
    (["export", "/no/such.ckpt", "--ou", "/no/such/out"], "--ou", "--out"),
    (["reference", "--photos", "/no/such/photos", "--class_word", "vase", "--out", "/no/such/out"],
     "--class_word", "--class-word"),
])
def test_an_abbreviated_or_misspelled_option_is_refused_naming_the_real_one(argv, given, meant, capsys):
    code, err = run_cli(argv, capsys)
    command = argv[0]
    assert code == 2, err
    assert err == [f"lrkit {command}: error: unrecognized option {given}; did you mean {meant}? "
                   f"(lrkit {command} --help lists every option)"]


def test_a_typo_in_a_nested_option_gets_one_line_with_the_closest_option(capsys):
    code, err = run_cli(["train", "--config", LORA_YAML, "--lora.rnk", "8"], capsys)
    assert code == 2
    assert err == ["lrkit train: error: unrecognized option --lora.rnk; did you mean --lora.rank? "
                   "(lrkit train --help lists every option)"]


def test_several_unknown_options_are_named_in_one_line(capsys):
    code, err = run_cli(["train", "--config", LORA_YAML, "--max_stepz", "4", "--colour", "red"], capsys)
    assert code == 2 and len(err) == 1, err
    assert "--max_stepz (did you mean --max_steps?)" in err[0] and "--colour" in err[0]


def test_an_unknown_key_in_a_config_file_is_named_with_the_closest_key(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(Path(LORA_YAML).read_text() + "max_step: 3\n")
    code, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2
    assert err == ["lrkit train: error: unrecognized key max_step; did you mean max_steps?"]
    nested = tmp_path / "nested.yaml"
    nested.write_text("lora:\n  rnk: 8\n")
    code, err = run_cli(["train", "--config", LORA_YAML, "--config", str(nested)], capsys)
    assert code == 2
    assert err == ["lrkit train: error: unrecognized key lora.rnk; did you mean lora.rank?"]


@pytest.mark.parametrize("argv, line", [
    (["train", "--config", LORA_YAML, "--data.resolution", "abc"],
     "lrkit train: error: --data.resolution: expected int, got 'abc'"),
    (["train", "--config", LORA_YAML, "--data.min_size", "abc"],
     "lrkit train: error: --data.min_size: expected int or None, got 'abc'"),
    (["train", "--config", LORA_YAML, "--data.buckets", "maybe"],
     "lrkit train: error: --data.buckets: expected true, false or auto, got 'maybe'"),
    (["train", "--config", LORA_YAML, "--data.center_crop", "maybe"],
     "lrkit train: error: --data.center_crop: expected true or false, got 'maybe'"),
    (["generate", "--prompt", "a {}"],
     "lrkit generate: error: missing --concept (lrkit generate --help lists every option)"),
    (["demo", "--seeds", "one"], "lrkit demo: error: argument --seeds: invalid int value: 'one'"),
    (["toyworld", "pretrain", "--out", "/no/such/run", "--minutes", "soon"],
     "lrkit toyworld pretrain: error: --minutes: expected float, got 'soon'"),
])
def test_a_bad_or_missing_value_is_one_line_naming_the_option(argv, line, capsys):
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err == [line]


def test_an_unknown_command_gets_one_line_with_the_closest_command(capsys):
    code, err = run_cli(["trian", "--max_steps", "3"], capsys)
    assert code == 2
    assert err == ["lrkit: error: unknown command 'trian'; did you mean train? (lrkit --help lists the commands)"]


def test_load_config_names_an_unknown_key_with_the_closest_one():
    from lrkit.training.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"unrecognized key max_step; did you mean max_steps\?"):
        load_config(LORA_YAML, max_step=3)
    with pytest.raises(ConfigError, match=r"unrecognized key lora\.rnk; did you mean lora\.rank\?"):
        load_config(LORA_YAML, lora={"rnk": 3})


def test_help_still_exits_0_and_lists_the_options(capsys):
    from lrkit.cli import main

    for command, option in (("train", "--max_steps"), ("export", "--overwrite"), ("toyworld", "pretrain")):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0
        assert option in capsys.readouterr().out


# ------------------------------------------------------------------------------------ errors while running


def test_an_lrkit_error_is_one_line_with_exit_code_2_and_no_traceback(tmp_path, capsys):
    code, err = run_cli(["train", "--config", LORA_YAML, "--data.photos", str(tmp_path / "nowhere"),
                         "--output_dir", str(tmp_path / "out")], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("lrkit train: error: photo folder") and "nowhere" in err[0], err


@pytest.mark.parametrize("where", ["before", "after", "env"])
def test_debug_adds_the_traceback(where, tmp_path, capsys, monkeypatch):
    argv = ["train", "--config", LORA_YAML, "--data.photos", str(tmp_path / "nowhere"), "--output_dir",
            str(tmp_path / "out")]
    if where == "env":
        monkeypatch.setenv("LRKIT_DEBUG", "1")
    else:
        argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert err[0] == "Traceback (most recent call last):" and "DataError" in "\n".join(err)
    assert err[-1].startswith("lrkit train: error: photo folder")


def test_an_unexpected_exception_is_one_line_pointing_to_debug_with_exit_code_1(capsys, monkeypatch):
    from lrkit import cli

    def broken(argv):
        raise KeyError("state")

    monkeypatch.setitem(cli.COMMANDS, "export", (broken, "broken"))
    code, err = run_cli(["export", "x.ckpt", "--out", "y"], capsys)
    assert code == 1
    assert err == ["lrkit export: error: unexpected KeyError: 'state' (a bug in lrkit; run with --debug for the "
                   "traceback)"]
    code, err = run_cli(["export", "--debug"], capsys)
    assert code == 1 and err[0] == "Traceback (most recent call last):"


def test_every_exception_class_of_lrkit_is_a_user_error():
    from lrkit.errors import is_user_error
    from lrkit.lora_io import LoraVersionError
    from lrkit.training.options import TrainingError

    assert is_user_error(TrainingError("x")) and is_user_error(LoraVersionError("x"))
    assert is_user_error(FileNotFoundError("x")) and is_user_error(ValueError("x"))
    assert not is_user_error(KeyError("x")) and not is_user_error(RuntimeError("x"))


def run_job_args(tmp_path: Path) -> list[str]:
    return ["run", "--photos", str(ROOT / "data" / "subjects" / "vase"), "--class_word", "vase",
            "--out", str(tmp_path / "run")]


@pytest.mark.parametrize("extra, line", [
    (["--prompt", "a photo of {}", "--max_steps", "0"], "lrkit run: error: max_steps must be >= 1, got 0"),
    (["--prompt", "a photo of {}", "--seeds", "[]"],
     "lrkit run: error: --seeds is empty; give at least one seed, e.g. [0,1]"),
    (["--prompt", "a photo of {}", "--seeds", "[1, 2, 1]"],
     "lrkit run: error: --seeds lists [1] more than once; give each seed once"),
    (["--prompt", " "], "lrkit run: error: --prompt ' ' is empty; give the text of a prompt"),
    ([], "lrkit run: error: give --prompt TEXT or --prompts FILE"),
    (["--prompt", "a dog"],
     "lrkit run: error: prompt 'a dog' mentions neither '{}' (which becomes 'sks vase') nor the concept token 'sks'"),
    (["--prompt", "a photo of {}", "--resolution", "60"],
     "lrkit run: error: data.resolution must be a positive multiple of 8, got 60"),
    (["--prompt", "a photo of {}", "--method", "hypernetwork"], "lrkit run: error: method 'hypernetwork' is not one"),
])
def test_run_refuses_bad_arguments_before_any_work(extra, line, tmp_path, capsys):
    code, err = run_cli([*run_job_args(tmp_path), *extra], capsys)
    assert code == 2
    assert len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_generate_refuses_empty_seeds_before_loading_anything(tmp_path, capsys):
    code, err = run_cli(["generate", "--concept", str(tmp_path / "no-such-concept"), "--prompt", "a {}",
                         "--seeds", "[]"], capsys)
    assert code == 2
    assert err == ["lrkit generate: error: --seeds is empty; give at least one seed, e.g. [0,1]"]


def test_demo_refuses_zero_steps(tmp_path, capsys):
    code, err = run_cli(["demo", "--out", str(tmp_path / "demo"), "--max-steps", "0"], capsys)
    assert code == 2
    assert err == ["lrkit demo: error: --max-steps must be >= 1, got 0"]
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("seeds, message", [("0,3,0", "lists [0] more than once"), ("0", "the count must be >= 1"),
                                            ("[]", "give a count N")])
def test_eval_refuses_bad_seeds(seeds, message):
    from lrkit.evaluation.cli import parse_seeds

    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_seeds(seeds)

"""Training refuses what would waste or corrupt a run: non-finite options, divergence, a folder in use, a checkpoint
trained from other inputs; and a resumed run appends to its metrics."""

from __future__ import annotations

import csv
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lrkit.cli import main
from lrkit.training import export_checkpoint, export_concept, train_concept
from lrkit.training.config import ConfigError, load_config
from lrkit.training.model import ConceptModel
from lrkit.training.options import TrainingError

ROOT = Path(__file__).resolve().parents[1]
LORA_YAML = str(ROOT / "configs" / "train" / "lora.yaml")


@pytest.fixture(scope="module")
def photos(vase_photos) -> Path:
    return vase_photos(2)


def config(photos: Path, out: Path, **overrides) -> dict:
    """A tiny LoRA run: 2 photos, one repeat, so an epoch (and a checkpoint) every 2 steps."""
    base = dict(base="tiny-random", method="lora", output_dir=str(out), accelerator="cpu", max_steps=4,
                data={"photos": str(photos), "class_word": "vase", "resolution": 64, "repeats": 1},
                validation={"prompts": []}, log_every_n_steps=1)
    return load_config(base, **overrides)


def metric_steps(out: Path) -> list[int]:
    rows = csv.DictReader(open(out / "logs" / "metrics.csv"))
    return [int(r["step"]) for r in rows if r.get("loss")]


def checkpoint_step(out: Path) -> int:
    return torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]


# ------------------------------------------------------------------------------------ non-finite options


def _float_options(cls=None, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, a non-finite value) of every float option of `TrainConfig` and its groups."""
    import dataclasses

    from lrkit.training.config import TrainConfig

    cls = cls or TrainConfig
    options = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            options += _float_options(type(default), f"{prefix}{f.name}.")
        elif "float" in str(f.type):
            options.append((prefix + f.name, [0.9, math.nan] if "tuple" in str(f.type) else math.inf))
    return options


def _nested(name: str, value) -> dict:
    group, _, field = name.rpartition(".")
    return {group: {field: value}} if group else {field: value}


@pytest.mark.parametrize("name, value", _float_options(), ids=[n for n, _ in _float_options()])
def test_a_non_finite_float_option_is_refused_naming_it(name, value):
    with pytest.raises(ConfigError, match=rf"^{name} must be a finite number"):
        load_config({"data": {"photos": "x", "class_word": "vase"}}, **_nested(name, value))


def test_the_float_options_checked_include_every_group():
    names = [n for n, _ in _float_options()]
    for name in ("optim.lr", "optim.embedding_lr", "optim.betas", "data.random_flip", "validation.guidance_scale",
                 "min_snr_gamma", "lora.alpha", "dreambooth.prior_loss_weight", "pivotal.ti_fraction",
                 "concept_em.crf_theta_alpha"):
        assert name in names


@pytest.mark.parametrize("override, message", [
    ({"optim": {"embedding_lr": 0.0}}, "optim.embedding_lr must be > 0"),
    ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay must be >= 0"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas must be two numbers in [0, 1)"),
    ({"optim": {"eps": 0.0}}, "optim.eps must be > 0"),
    ({"optim": {"max_grad_norm": 0.0}}, "optim.max_grad_norm must be > 0"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"log_every_n_steps": 0}, "log_every_n_steps must be >= 1"),
    ({"validation": {"num_inference_steps": 0}}, "validation.num_inference_steps must be >= 1"),
])
def test_an_out_of_range_option_is_refused_naming_it(override, message):
    with pytest.raises(ConfigError, match=rf"^{message.replace('[', '.').replace(')', '.')}"):
        load_config({"data": {"photos": "x", "class_word": "vase"}}, **override)


def test_an_infinite_lr_in_a_yaml_is_refused_before_anything_is_written(tmp_path, photos, capsys):
    (tmp_path / "inf.yaml").write_text("optim:\n  lr: .inf\n")
    out = tmp_path / "out"
    code = main(["train", "--config", LORA_YAML, "--config", str(tmp_path / "inf.yaml"), "--base", "tiny-random",
                 "--data.photos", str(photos), "--output_dir", str(out), "--accelerator", "cpu"])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err == ["lrkit train: error: optim.lr must be a finite number, got inf"]
    assert not out.exists()


@pytest.mark.parametrize("value", ["inf", ".inf", "nan"])
def test_an_infinite_lr_on_the_command_line_is_refused_before_anything_is_written(value, tmp_path, photos, capsys):
    out = tmp_path / "out"
    code = main(["train", "--config", LORA_YAML, "--base", "tiny-random", "--data.photos", str(photos),
                 "--output_dir", str(out), "--optim.lr", value])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("lrkit train: error: ") and "optim.lr must be a finite number" in err[0], err
    assert not out.exists()


# ------------------------------------------------------------------------------------ divergence


def test_a_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, photos, monkeypatch):
    calls = []
    loss = ConceptModel.loss

    def diverging_loss(self, batch, generators):
        value, logs = loss(self, batch, generators)
        calls.append(1)
        return (value * math.nan if len(calls) == 5 else value), logs  # step 4 (0-based) diverges

    monkeypatch.setattr(ConceptModel, "loss", diverging_loss)
    out = tmp_path / "run"
    with pytest.raises(TrainingError) as err:
        train_concept(config(photos, out, max_steps=8, log_every_n_steps=10))
    message = str(err.value)
    assert "loss became NaN or infinite at step 4" in message and "optim.lr" in message
    assert str(out / "checkpoints" / "last.ckpt") in message
    assert checkpoint_step(out) == 4  # the checkpoint of step 6 was refused
    assert not (out / "concept").exists()
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(torch.isfinite(t).all() for t in state.values())

    monkeypatch.setattr(ConceptModel, "loss", loss)
    bundle = export_checkpoint(out / "checkpoints" / "last.ckpt", tmp_path / "kept")
    weights = load_file(bundle / "pytorch_lora_weights.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_an_exploding_learning_rate_is_stopped_before_any_checkpoint_or_bundle(tmp_path, photos, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", LORA_YAML, "--base", "tiny-random", "--data.photos", str(photos),
                 "--data.resolution", "64", "--data.repeats", "1", "--output_dir", str(out), "--accelerator", "cpu",
                 "--validation.prompts", "[]", "--max_steps", "6", "--optim.lr", "1e30"])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(err) == 1 and "training diverged" in err[0] and "lower optim.lr (now 1e+30)" in err[0], err
    assert not (out / "concept").exists() and not (out / "checkpoints" / "last.ckpt").exists()


def test_export_refuses_weights_that_are_not_finite(tmp_path, photos):
    cfg = config(photos, tmp_path / "run")
    model = ConceptModel(cfg)
    name, weight = next((n, p) for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        weight[0] = math.inf
    with pytest.raises(TrainingError, match=rf"no bundle written to .*: {name} holds NaN or infinite values"):
        export_concept(model, cfg, tmp_path / "bundle")
    assert not (tmp_path / "bundle").exists()


# ------------------------------------------------------------------------------------ the folder lock

HOLD_LOCK = """
import sys, time
from lrkit.training.folder import folder_lock
with folder_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path, photos, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["train", "--config", LORA_YAML, "--base", "tiny-random", "--data.photos", str(photos),
                     "--data.resolution", "64", "--output_dir", str(out), "--accelerator", "cpu", "--max_steps", "2"])
        err = capsys.readouterr().err.splitlines()
        assert code == 2
        assert err == [f"lrkit train: error: output_dir {str(out)!r} is in use by another training run "
                       f"(pid {holder.pid}); wait for it to finish, or pass another --output_dir"]
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing else written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the killed holder's lock file stays, but its lock died with it
    bundle = train_concept(config(photos, out, max_steps=2))
    assert (bundle / "concept.json").is_file()
    assert (out / ".lock").read_text() == ""  # released


def test_the_lock_is_released_when_a_run_fails(tmp_path, photos):
    out = tmp_path / "run"
    with pytest.raises(TrainingError):
        train_concept(config(photos, out, optim={"lr": 1e30}))
    train_concept(config(photos, out, resume=None))  # not refused as "in use"


# ------------------------------------------------------------------------------------ resume


@pytest.fixture
def trained_run(tmp_path, photos) -> Path:
    out = tmp_path / "run"
    train_concept(config(photos, out, max_steps=2))
    return out


@pytest.mark.parametrize("change, fields", [
    ({"data": {"class_word": "pot"}}, ["data.class_word: 'vase' -> 'pot'"]),
    ({"seed": 7}, ["seed: 0 -> 7"]),
    ({"lora": {"rank": 8}}, ["lora.rank: 4 -> 8"]),
    ({"method": "textual_inversion"}, ["method: 'lora' -> 'textual_inversion'", "data.token: 'sks' -> '<sks>'"]),
    ({"optim": {"lr": 1e-3}, "data": {"caption_template": "a {token} {class}"}},
     ["optim.lr: 0.0001 -> 0.001", "data.caption_template: 'a photo of {token} {class}' -> 'a {token} {class}'"]),
])
def test_resuming_with_other_inputs_is_refused_listing_what_changed(change, fields, trained_run, photos):
    checkpoint = trained_run / "checkpoints" / "last.ckpt"
    before = checkpoint.read_bytes()
    with pytest.raises(TrainingError) as err:
        train_concept(config(photos, trained_run, max_steps=4, overwrite=True, **change))
    message = str(err.value)
    assert message.startswith(f"checkpoint {str(checkpoint)!r} was trained from other inputs (")
    for field in fields:
        assert field in message
    assert "--output_dir" in message and "--resume null" in message
    assert checkpoint.read_bytes() == before
    assert metric_steps(trained_run) == [0, 1]


def test_resuming_with_other_photos_is_refused(trained_run, photos, vase_photos):
    with pytest.raises(TrainingError, match=r"other inputs \(photos: '[0-9a-f]{12}…' -> '[0-9a-f]{12}…'\)"):
        train_concept(config(vase_photos(3), trained_run, max_steps=4, overwrite=True))


def test_a_fresh_start_replaces_a_run_trained_from_other_inputs(trained_run, photos):
    train_concept(config(photos, trained_run, max_steps=2, overwrite=True, resume=None, seed=7))
    assert checkpoint_step(trained_run) == 2 and metric_steps(trained_run) == [0, 1]  # not appended
    train_concept(config(photos, trained_run, max_steps=4, overwrite=True, seed=7))  # and it resumes as itself
    assert checkpoint_step(trained_run) == 4


def test_a_resume_appends_to_the_metrics_of_the_steps_before_it(trained_run, photos):
    metrics = trained_run / "logs" / "metrics.csv"
    rows = list(csv.DictReader(open(metrics)))
    # a killed run may have logged steps after its last checkpoint (2): those are trained again
    with open(metrics, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows([dict(rows[0], step=2, loss=9.0),
                                                               dict(rows[0], step=3, loss=9.0)])
    train_concept(config(photos, trained_run, max_steps=4, overwrite=True))
    resumed = list(csv.DictReader(open(metrics)))
    assert [int(r["step"]) for r in resumed] == [0, 1, 2, 3]
    assert resumed[:2] == rows  # the first run's rows, as they were
    assert all(float(r["loss"]) != 9.0 for r in resumed)


def test_the_run_record_names_the_inputs(trained_run):
    import json

    record = json.loads((trained_run / "run.json").read_text())
    assert len(record["digest"]) == 64
    assert record["inputs"]["data"]["class_word"] == "vase" and record["inputs"]["method"] == "lora"
    assert "max_steps" not in record["inputs"] and "lora" in record["inputs"] and "dreambooth" not in record["inputs"]
    assert record["base"]["id"] == "tiny-random"


def test_a_checkpoint_records_what_it_was_trained_from(trained_run, photos):
    from lrkit.training.folder import read_checkpoint, training_inputs
    from lrkit.training.module import ConceptDataModule

    cfg = config(photos, trained_run)
    record, step = read_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    assert step == 2
    assert record["inputs"] == training_inputs(cfg, ConceptDataModule(cfg).photos)


@pytest.mark.slow
def test_two_concurrent_cli_runs_into_one_folder_give_one_clear_refusal(tmp_path, photos):
    from launching import env

    out = tmp_path / "run"
    args = [sys.executable, "-m", "lrkit.cli", "train", "--config", LORA_YAML, "--base", "tiny-random",
            "--data.photos", str(photos), "--data.resolution", "64", "--data.repeats", "1", "--output_dir", str(out),
            "--accelerator", "cpu", "--validation.prompts", "[]", "--max_steps", "100000"]
    first = subprocess.Popen(args, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "last.ckpt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        second = subprocess.run(args, env=env(), capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if "error" in line]
    assert errors == [f"lrkit train: error: output_dir {str(out)!r} is in use by another training run "
                      f"(pid {first.pid}); wait for it to finish, or pass another --output_dir"]

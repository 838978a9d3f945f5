"""Every shipped YAML is a valid saved config of its entry point."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from lrkit.training.config import TrainConfig, build_parser, load_config

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml")) + [ROOT / "configs" / "demo.yaml"]


def test_there_is_a_config_per_method():
    assert {p.stem for p in (ROOT / "configs" / "train").glob("*.yaml")} >= {
        "dreambooth", "lora", "textual_inversion", "pivotal"}


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_loads_and_round_trips(path):
    config = load_config(path)
    assert isinstance(config, TrainConfig)
    raw = yaml.safe_load(path.read_text())
    assert config.method == raw["method"] and config.base == raw["base"]
    if path.parent.name == "train":
        # [sdxl_]<method>[_fsdp].yaml: the method, on SDXL, sharded over GPUs
        assert config.method == path.stem.removeprefix("sdxl_").removesuffix("_fsdp")
        assert (config.strategy == "fsdp") == path.stem.endswith("_fsdp")
        assert config.family == ("sdxl" if path.stem.startswith("sdxl_") else None)
    # Dumping and re-reading gives the same config (YAML files are nothing but saved arguments).
    parser = build_parser()
    dumped = parser.dump(parser.parse_object(config.to_dict()))
    assert load_config(yaml.safe_load(dumped)) == config


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_train_config_paths_exist(path):
    config = load_config(path)
    assert (ROOT / config.data.photos).is_dir(), f"{path.name}: data.photos {config.data.photos!r} is not shipped"


INFER_CONFIGS = sorted((ROOT / "configs" / "infer").glob("*.yaml"))


def test_there_is_an_inference_config():
    assert INFER_CONFIGS


@pytest.mark.parametrize("path", INFER_CONFIGS, ids=lambda p: p.name)
def test_infer_config_loads_against_the_generate_entry_point(path):
    from lrkit.cli import _generation_parser
    from lrkit.inference import GenerationOptions

    parser = _generation_parser("lrkit generate", "")
    args = parser.instantiate(parser.parse_args(["--config", str(path)]))
    assert isinstance(args.options, GenerationOptions)
    raw = yaml.safe_load(path.read_text())
    parsed = dataclasses.asdict(args.options)

    def check(given: dict, got: dict, where: str) -> None:  # every value the YAML sets arrives, group by group
        for key, value in given.items():
            assert key in got, f"{where}.{key}"
            if isinstance(value, dict):
                check(value, got[key], f"{where}.{key}")
            else:
                assert got[key] == value, f"{where}.{key}"

    check(raw["options"], parsed, "options")


@pytest.mark.parametrize("command, option, words", [
    ("train", "--concept_em.crf_resolution", "Side of the grid the CRF runs on"),
    ("train", "--lora.rank", "LoRA rank"),
    ("generate", "--options.num_inference_steps", "Denoising steps T (DDIM)."),
])
def test_help_shows_each_options_docstring(command, option, words, capsys):
    """`lrkit train --help` / `lrkit generate --help` carry the dataclass fields' docstrings, not only their types."""
    from lrkit.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    assert words in text.rsplit(option, 1)[1][:400], f"{option}'s help has no description"  # its entry, not the usage

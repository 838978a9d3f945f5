"""`lrkit` prints its own messages and progress bars; third-party noise only with -v."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from launching import ROOT, run

# What third-party libraries print on lrkit's calls, none of it for the user to act on.
NOISE = (
    "gemm_4bit_forward",  # bitsandbytes, imported by peft: an optional 4-bit CPU kernel it could not fetch
    "litlogger", "litmodels", "Tip:",  # Lightning's advertisements
    "LeafSpec", "pytree",  # a torch deprecation inside Lightning
    "No LoRA keys associated",  # diffusers, on a LoRA without a text-encoder part
    "should be kept in float32: []",  # diffusers, on casting a model none of whose modules stays float32
)
BAR = re.compile(r"^\s*(?P<desc>[^:\r\n|]*):\s+(\d+%)?\|")  # tqdm: 'training:  50%|█████     | 1/2 ...'


def lrkit(*argv: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "lrkit.cli", *argv])


def noise_in(text: str) -> list[str]:
    return [n for n in NOISE if n in text]


def bar_descriptions(text: str) -> list[str]:
    """The description of every progress-bar line tqdm drew, in order (each `\\r` redraw counts)."""
    return [m["desc"].strip() for line in re.split(r"[\r\n]", text) if (m := BAR.match(line))]


@pytest.fixture(scope="module")
def training_run(tmp_path_factory):
    """A tiny LoRA run: 2 steps at 64 px with validation images every 2 steps."""
    out = tmp_path_factory.mktemp("quiet") / "run"
    proc = lrkit("train", "--config", str(ROOT / "configs/train/lora.yaml"), "--base", "tiny-random",
                 "--data.resolution", "64", "--max_steps", "2", "--validation.every_n_steps", "2",
                 "--validation.num_inference_steps", "2", "--output_dir", str(out), "--overwrite", "true")
    return proc, out / "concept"


@pytest.mark.parametrize("argv", [["--help"], pytest.param(["train", "--help"], marks=pytest.mark.slow)])
def test_help_prints_the_help_alone_and_imports_no_bitsandbytes(argv):
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes may log on import."""
    code = ("import sys\nfrom lrkit.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('imported:', sorted(m for m in ('peft', 'bitsandbytes') if m in sys.modules))")
    proc = run([sys.executable, "-c", code, *argv])
    assert proc.stderr == "", proc.stderr
    assert "usage:" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "imported: []"


def test_the_bitsandbytes_kernel_message_shows_only_with_verbose():
    """bitsandbytes logs it on CPUs with AVX512-BF16 when peft imports it; here it is logged by hand."""
    code = ("import logging, sys\nfrom lrkit.cli import main\nmain(sys.argv[1:])\n"
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
            "'Failed to load CPU gemm_4bit_forward from kernels-community: no network')")
    quiet = run([sys.executable, "-c", code, "--help"])
    assert "gemm_4bit_forward" not in quiet.stderr
    verbose = run([sys.executable, "-c", code, "-v", "--help"])
    assert "gemm_4bit_forward" in verbose.stderr


@pytest.mark.slow
def test_a_training_run_prints_lrkit_messages_and_no_third_party_noise(training_run):
    proc, concept = training_run
    shown = proc.stdout + proc.stderr
    assert not noise_in(shown), shown[-3000:]
    assert "INFO lrkit.training.train: wrote concept bundle" in proc.stderr
    assert proc.stdout.rstrip().endswith(str(concept))


@pytest.mark.slow
def test_a_training_run_draws_one_progress_bar(training_run):
    """Training with validation images in between: one `training` bar, from 0/2 to 2/2, and no other bar."""
    proc, _ = training_run
    descriptions = bar_descriptions(proc.stdout + proc.stderr)
    assert descriptions and set(descriptions) == {"training"}, descriptions
    first_drawn = next(line for line in re.split(r"[\r\n]", proc.stdout) if BAR.match(line))
    assert "0/2" in first_drawn, first_drawn


@pytest.mark.slow
def test_generate_is_quiet_and_verbose_adds_third_party_logging(training_run, tmp_path):
    _, concept = training_run
    argv = ["generate", "--concept", str(concept), "--prompt", "a photo of {}", "--seeds", "[0]",
            "--options.mode", "personalized", "--options.num_inference_steps", "2", "--out", str(tmp_path / "images")]
    quiet = lrkit(*argv)
    assert not noise_in(quiet.stdout + quiet.stderr), quiet.stderr
    assert set(bar_descriptions(quiet.stdout + quiet.stderr)) == {"generating"}
    verbose = lrkit("-v", *argv)
    assert "INFO lrkit.concept: base model tiny-random (recorded in the concept)" in verbose.stderr
    assert len(verbose.stderr.splitlines()) > len(quiet.stderr.splitlines()), verbose.stderr  # diffusers' INFO lines


def test_the_verbose_flag_goes_before_or_after_the_command():
    from lrkit.cli import _split_verbosity

    assert _split_verbosity(["-v", "train", "--max_steps", "3"]) == (["train", "--max_steps", "3"], 1)
    assert _split_verbosity(["train", "--verbose", "--max_steps", "3", "-vv"]) == (["train", "--max_steps", "3"], 3)
    assert _split_verbosity(["demo", "--", "-v"]) == (["demo", "--", "-v"], 0)


def test_the_sam_warning_says_what_is_missing(monkeypatch, caplog):
    import importlib.util
    import logging

    from lrkit.masks import load_segmenter

    installed = importlib.util.find_spec("segment_anything") is not None
    with caplog.at_level(logging.WARNING, logger="lrkit.masks"):
        load_segmenter(None)
    assert ("pip install 'lrkit[sam]'" in caplog.text) is not installed, caplog.text
    assert "sam_checkpoint" in caplog.text
    caplog.clear()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "segment_anything" else find_spec(name, *a))
    with caplog.at_level(logging.WARNING, logger="lrkit.masks"):
        load_segmenter(None)
    assert "pip install 'lrkit[sam]'" in caplog.text


@pytest.mark.slow
def test_a_concepts_repr_is_short_and_names_its_key_fields(training_run):
    from lrkit.concept import Concept

    _, folder = training_run
    concept = Concept.load(folder)
    text = repr(concept)
    assert len(text) < 300, text
    for part in (f"name={concept.name!r}", "method='lora'", "tokens=['sks']", "class_word='vase'",
                 "base='tiny-random'", f"path={str(concept.path)!r}"):
        assert part in text, text

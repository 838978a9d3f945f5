"""Jobs know their inputs: `lrkit run` and `lrkit eval` resume only into folders made from the same inputs, refuse
others naming what changed (touching nothing), and write each image unit so that a kill or a truncated file
leaves it complete or visibly incomplete, made again on the next run, byte for byte as an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lrkit.cli import main
from lrkit.inference.outputs import NOT_WRITTEN, image_path, record_path, save_generation, unit_problem
from lrkit.inference.pipeline import Generation
from lrkit.jobs import JOB_FILE, JobInputsError, photos_to_images, train_or_reuse

from launching import ROOT, env

PROMPTS = "a photo of {} on the beach\na {} in the snow\n"

# Starts `lrkit` with every write of a unit file (a PNG or a unit record in an `images` folder) counted, and
# SIGKILLs itself right after write number $KILL_AFTER_UNIT_WRITES: in the middle of a unit, between its
# intermediates and its image, or between its image and its record.
KILLING_RUNNER = '''
import os, signal, sys
from pathlib import Path

import lrkit.inference.outputs as outputs
import lrkit.io
from lrkit.cli import main

LIMIT = int(os.environ.get("KILL_AFTER_UNIT_WRITES", "0"))
count = 0


def counted(write):
    def write_and_maybe_die(path, data):
        global count
        result = write(path, data)
        if Path(path).parent.name == "images" and Path(path).name.startswith("p"):
            count += 1
            if count == LIMIT:
                os.kill(os.getpid(), signal.SIGKILL)
        return result
    return write_and_maybe_die


outputs.atomic_write_bytes = counted(outputs.atomic_write_bytes)  # the PNGs
lrkit.io.atomic_write_bytes = counted(lrkit.io.atomic_write_bytes)  # the unit records (atomic_write_json)
sys.exit(main(sys.argv[1:]))
'''


def make_photos(where: Path, n: int = 2) -> Path:
    """A photo folder named `vase` (the run's training folder is OUT/vase) with the first n shipped vase photos."""
    folder = where / "vase"
    folder.mkdir(parents=True)
    for photo in sorted((ROOT / "data" / "subjects" / "vase").glob("*.jpg"))[:n]:
        shutil.copy(photo, folder / photo.name)
    return folder


def run_args(photos: Path, out: Path, *, class_word: str = "vase", prompts: str = PROMPTS, seeds: str = "[0, 1]",
             steps: str = "3", max_steps: str = "1", extra: tuple[str, ...] = ()) -> list[str]:
    prompt_file = out.parent / f"{out.name}_prompts.txt"
    prompt_file.write_text(prompts)
    return ["run", "--photos", str(photos), "--class_word", class_word, "--prompts", str(prompt_file), "--max_steps",
            max_steps, "--out", str(out), "--seeds", seeds, "--options.num_inference_steps", steps, *extra]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`lrkit ARGV` in this process: its exit code and its error line (`lrkit COMMAND: error: ...`)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as done:
        code = done.code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"lrkit {argv[0]}: error:")]
    assert len(errors) <= 1, errors
    return code, "".join(errors)


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `folder`: (size, mtime_ns, sha256)."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                               hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def images(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").iterdir())}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return make_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, photos) -> Path:
    """A finished `lrkit run` (2 prompts x 2 seeds); tests that change it work on a copy."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(run_args(photos, out)) == 0
    return out


@pytest.fixture()
def copy_of(tmp_path):
    def copy(out: Path) -> Path:
        target = tmp_path / "run"
        shutil.copytree(out, target)
        return target

    return copy


# ------------------------------------------------------------------------------------ records


def test_a_run_records_its_inputs_and_every_unit(finished):
    job = json.loads((finished / "images" / JOB_FILE).read_text())
    assert job["format"] == "lrkit.generation-job/1" and len(job["digest"]) == 64
    assert job["inputs"]["options"]["num_inference_steps"] == 3 and job["inputs"]["concept"]["class_word"] == "vase"
    assert job["prompts"] == {"0": "a photo of sks vase on the beach", "1": "a sks vase in the snow"}
    assert job["seeds"] == [0, 1]
    training = json.loads((finished / "vase" / JOB_FILE).read_text())
    assert training["inputs"]["class_word"] == "vase" and training["inputs"]["overrides"] == {"max_steps": 1}
    assert training["inputs"]["photos"]["files"] == 2 and len(training["concept_sha256"]) == 64
    for index in (0, 1):
        for seed in (0, 1):
            record = json.loads(record_path(finished / "images", index, seed).read_text())
            assert record["job"] == job["digest"] and record["prompt"] == job["prompts"][str(index)]
            assert sorted(record["files"]) == sorted(f"p{index:03d}_s{seed}{k}.png"
                                                     for k in ("", "_layout", "_mask", "_grid"))
            for name, meta in record["files"].items():
                data = (finished / "images" / name).read_bytes()
                assert meta == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _generation(color: str = "red") -> Generation:
    tile = Image.new("RGB", (8, 8), color)
    return Generation(0, "a photo", 1, tile, layout=tile, mask=Image.new("L", (8, 8), 255), reference=tile)


def test_a_unit_is_complete_only_with_its_record_and_intact_files(tmp_path):
    ok = dict(prompt="a photo", job="j")
    assert unit_problem(tmp_path, 0, 1, **ok) == NOT_WRITTEN
    save_generation(_generation(), tmp_path, intermediates=True, job="j")
    assert unit_problem(tmp_path, 0, 1, intermediates=True, **ok) is None
    assert "other inputs" in unit_problem(tmp_path, 0, 1, prompt="a photo", job="k")
    assert "other inputs" in unit_problem(tmp_path, 0, 1, prompt="a drawing", job="j")
    grid = image_path(tmp_path, 0, 1, "grid")
    grid.write_bytes(grid.read_bytes()[:-10])
    assert "p000_s1_grid.png does not match its record" in unit_problem(tmp_path, 0, 1, **ok)
    save_generation(_generation(), tmp_path, job="j")  # again without intermediates: their old files go
    assert not grid.exists() and unit_problem(tmp_path, 0, 1, **ok) is None
    assert "does not list" in unit_problem(tmp_path, 0, 1, intermediates=True, **ok)
    record_path(tmp_path, 0, 1).unlink()
    assert "no record" in unit_problem(tmp_path, 0, 1, **ok)


# ------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("change, expected", [
    (dict(class_word="cup"), "class_word: 'vase' -> 'cup'"),
    (dict(max_steps="2"), "overrides.max_steps: 1 -> 2"),
    (dict(extra=("--method", "textual_inversion")), "method: 'lora' -> 'textual_inversion'"),
    (dict(extra=("--resolution", "32")), "resolution: 64 -> 32"),
    (dict(steps="4"), "options.num_inference_steps: 3 -> 4"),
    (dict(extra=("--options.layout.lam", "0.5")), "options.layout.lam: 0.3 -> 0.5"),
    (dict(prompts="a photo of {} on the beach\na {} in the rain\n"),
     "prompt 1: 'a sks vase in the snow' -> 'a sks vase in the rain'"),
    (dict(prompts="a {} in the snow\n"), "prompt 0: 'a photo of sks vase on the beach' -> 'a sks vase in the snow'"),
])
def test_a_rerun_with_other_inputs_is_refused_naming_them_and_changes_nothing(finished, photos, change, expected,
                                                                               capsys):
    before = snapshot(finished)
    code, err = run_cli(run_args(photos, finished, **change), capsys)
    assert code != 0 and expected in err, err
    assert "--overwrite" in err and "--out" in err
    assert snapshot(finished) == before


def test_other_photos_under_the_same_folder_name_are_refused(finished, tmp_path, capsys):
    before = snapshot(finished)
    for other in (make_photos(tmp_path / "three", n=3), make_photos(tmp_path / "edited")):
        if other.parent.name == "edited":
            photo = sorted(other.glob("*.jpg"))[0]
            photo.write_bytes(photo.read_bytes() + b"\0")
        code, err = run_cli(run_args(other, finished), capsys)
        assert code != 0 and "concept was trained from other inputs" in err and "photos.sha256" in err, err
    assert snapshot(finished) == before


def test_a_bundle_without_a_record_of_its_inputs_is_refused(finished, photos, copy_of, capsys):
    out = copy_of(finished)
    (out / "vase" / JOB_FILE).unlink()
    before = snapshot(out)
    code, err = run_cli(run_args(photos, out), capsys)
    assert code != 0 and "without a record of its inputs" in err, err
    assert snapshot(out) == before


def test_a_bundle_changed_since_training_is_refused(finished, photos, copy_of):
    out = copy_of(finished)
    (out / "vase" / "concept" / "README.md").write_text("edited\n")
    with pytest.raises(JobInputsError, match="files changed since it was trained"):
        train_or_reuse(photos, "vase", out / "vase", base="tiny-random", train_overrides={"max_steps": 1})


# ------------------------------------------------------------------------------------ what may change


def test_more_seeds_and_prompts_go_into_the_same_folder(finished, photos, copy_of):
    out = copy_of(finished)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("p*")}
    prompts = PROMPTS + "a {} on the grass\n"
    assert main(run_args(photos, out, prompts=prompts, seeds="[0, 1, 2]")) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "images").glob("p*")}
    assert all(after[name] == mtime for name, mtime in before.items())  # finished units untouched
    assert sorted(p.name for p in (out / "images").glob("p*_s?.json")) == [
        f"p{i:03d}_s{s}.json" for i in range(3) for s in range(3)]
    job = json.loads((out / "images" / JOB_FILE).read_text())
    assert job["seeds"] == [0, 1, 2] and job["prompts"]["2"] == "a sks vase on the grass"


def test_overwrite_replaces_the_work_of_other_inputs(finished, photos, copy_of):
    from lrkit.inference import GenerationOptions

    out = copy_of(finished)
    sheet = photos_to_images(photos, "vase", ["a {} in the rain"], out_dir=out, seeds=[0],
                             options=GenerationOptions(num_inference_steps=4), train_overrides={"max_steps": 1},
                             overwrite=True)
    assert sheet.is_file()
    job = json.loads((out / "images" / JOB_FILE).read_text())
    assert job["inputs"]["options"]["num_inference_steps"] == 4 and job["prompts"] == {"0": "a sks vase in the rain"}
    names = sorted(p.name for p in (out / "images").glob("p*"))
    assert names == ["p000_s0.json", "p000_s0.png", "p000_s0_grid.png", "p000_s0_layout.png", "p000_s0_mask.png"]
    record = json.loads(record_path(out / "images", 0, 0).read_text())
    assert record["job"] == job["digest"] and record["prompt"] == "a sks vase in the rain"


def test_overwrite_trains_again_from_other_photos(finished, tmp_path, copy_of, caplog):
    out = copy_of(finished)
    other = make_photos(tmp_path / "three", n=3)
    caplog.set_level("INFO")
    photos_to_images(other, "vase", [PROMPTS.splitlines()[0]], out_dir=out, seeds=[0],
                     train_overrides={"max_steps": 1}, overwrite=True)
    assert "overwrite: training again (photos.files: 2 -> 3" in caplog.text
    training = json.loads((out / "vase" / JOB_FILE).read_text())
    assert training["inputs"]["photos"]["files"] == 3
    assert len(list((out / "vase" / "concept" / "refs").iterdir())) == 3


@pytest.mark.parametrize("base, cuda, expected", [
    ("tiny-random", True, {"max_steps": 1}),
    ("tiny-random-xl", False, {"gradient_checkpointing": True, "cache_latents": True, "max_steps": 1}),
    ("tiny-random-xl", True, {"gradient_checkpointing": True, "cache_latents": True, "precision": "bf16-mixed",
                              "max_steps": 1}),
])
def test_run_trains_sdxl_with_the_memory_options_of_the_sdxl_configs(base, cuda, expected, photos, tmp_path,
                                                                     monkeypatch):
    """`lrkit run` on SDXL: gradient checkpointing, cached latents, bf16-mixed on a GPU (the options of
    configs/train/sdxl_*.yaml); nothing added on SD; what the caller passes wins."""
    import torch

    import lrkit.jobs as jobs

    class Stop(Exception):
        pass

    seen = {}

    def capture(*args, train_overrides=None, **kwargs):
        seen.update(train_overrides)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(jobs, "train_or_reuse", capture)
    with pytest.raises(Stop):
        photos_to_images(photos, "vase", ["a {}"], base=base, out_dir=tmp_path / "run", train_overrides={"max_steps": 1})
    assert seen == expected
    with pytest.raises(Stop):
        photos_to_images(photos, "vase", ["a {}"], base=base, out_dir=tmp_path / "run",
                         train_overrides={"gradient_checkpointing": False})
    assert seen["gradient_checkpointing"] is False


# ------------------------------------------------------------------------------------ corrupted and killed units


def test_a_truncated_image_is_detected_and_made_again(finished, photos, copy_of, caplog):
    out = copy_of(finished)
    image = out / "images" / "p001_s0.png"
    original = image.read_bytes()
    image.write_bytes(original[: len(original) // 2])
    caplog.set_level("INFO")
    assert main(run_args(photos, out)) == 0
    assert "p001_s0: p001_s0.png does not match its record (truncated or changed since it was written)" in caplog.text
    assert image.read_bytes() == original
    assert "3 of 4 images already exist" in caplog.text


def test_a_run_killed_anywhere_in_a_unit_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, photos):
    """Kills after unit-file writes 4 (p000_s0's image written, not its record), 8 (p000_s1's intermediates
    written, not its image) and 6 (p001_s0's layout written, not its mask), each run resuming the last; then a
    run to the end."""
    runner = tmp_path / "killing_runner.py"
    runner.write_text(KILLING_RUNNER)

    def start(out: Path, kill_after: int | None) -> subprocess.CompletedProcess:
        environment = dict(env(), KILL_AFTER_UNIT_WRITES=str(kill_after or 0))
        return subprocess.run([sys.executable, str(runner), *run_args(photos, out)], env=environment, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)

    reference = tmp_path / "uninterrupted"
    done = start(reference, None)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copytree(reference / "vase", killed / "vase")  # the same concept: only generation is killed
    logs = []
    for kill_after in (4, 8, 6):
        proc = start(killed, kill_after)
        assert proc.returncode == -9, f"not killed after write {kill_after}: {proc.stderr[-2000:]}"
        logs.append(proc.stderr)
    proc = start(killed, None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "p000_s0: it has no record p000_s0.json (its writing was interrupted); generating it again" in logs[1]
    assert "p000_s1: it has no record" in logs[2] and "p001_s0: it has no record" in proc.stderr
    assert images(killed) == images(reference)  # every PNG, every unit record and job.json, byte for byte
    assert not [p for p in (killed / "images").iterdir() if p.name.startswith(".")]  # no temporary files left


# ------------------------------------------------------------------------------------ lrkit eval


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_pipe):
    """A finished `lrkit eval` of a hand-written Textual-Inversion concept (no training, no metric models): its
    folder, concept, prompt file and arguments."""
    from test_evaluation_runner import write_ti_concept

    work = tmp_path_factory.mktemp("eval")
    photos = [Image.open(p) for p in sorted((ROOT / "data" / "subjects" / "vase").glob("*.jpg"))[:2]]
    concept = write_ti_concept(tiny_pipe(), work / "vase_ti", "vase_ti", "vase", photos)
    prompts = work / "prompts.txt"
    prompts.write_text("a {} on the beach\na {} in the snow\n")
    out = work / "out"
    args = ["eval", "--concepts", str(concept), "--prompts", str(prompts), "--methods", "vanilla", "--seeds", "0,1",
            "--out", str(out), "--clip_model", "none", "--dino_model", "none", "--options.num_inference_steps", "2"]
    assert main(args) == 0
    return out, concept, prompts, args


def test_eval_with_other_prompts_is_refused_and_scores_nothing(eval_run, capsys):
    out, _, prompts, args = eval_run
    before = snapshot(out)
    prompts.write_text("a {} on the beach\na {} on the moon\n")
    try:
        code, err = run_cli(args, capsys)
    finally:
        prompts.write_text("a {} on the beach\na {} in the snow\n")
    assert code != 0
    assert "prompt 1: 'a <vase_ti> vase in the snow' -> 'a <vase_ti> vase on the moon'" in err
    assert "use a new --out" in err
    assert snapshot(out) == before


def test_eval_with_a_changed_concept_bundle_is_refused(eval_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    out, concept, _, args = eval_run
    changed = tmp_path / "vase_ti"
    shutil.copytree(concept, changed)
    weights = changed / "learned_embeds.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights))
    before = snapshot(out)
    code, err = run_cli([changed.as_posix() if a == str(concept) else a for a in args], capsys)
    assert code != 0 and "concept.sha256" in err, err
    assert snapshot(out) == before

"""`lrkit eval`: rows exactly once (also after a SIGKILL), scores re-computable from the saved images,
two processes == one process, the toy world's exact scorers, clear errors.

Concepts are written by hand (a Textual-Inversion token with a seeded random vector, the photos as
refs), so no training runs here; metric models are the tiny CLIP/DINO saved to disk.
"""

from __future__ import annotations

import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lrkit.cli import main

from launching import BIN, ROOT, env, run
PROMPTS = "a {} on the beach\na {} in the snow\n"


def write_ti_concept(pipe, out: Path, name: str, class_word: str, photos: list[Image.Image], resolution: int = 64) -> Path:
    """A Textual-Inversion bundle for `pipe`'s base: one learned token `<name>` (seeded vector), `photos` as refs."""
    from safetensors.torch import save_file

    from lrkit.concept import Concept, TokenSpec, write_bundle
    from lrkit.models import fingerprint

    token = f"<{name}>"
    vector = torch.randn(1, pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))
    concept = Concept(name=name, method="textual_inversion", class_word=class_word, base=fingerprint(pipe),
                      tokens=[TokenSpec(token, learned=True, num_vectors=1, initializer=class_word)],
                      resolution=resolution, files={"embeddings": "learned_embeds.safetensors"},
                      refs=[f"refs/{i:02d}.png" for i in range(len(photos))])

    def write(tmp: Path) -> None:
        save_file({token: vector}, str(tmp / "learned_embeds.safetensors"))
        (tmp / "refs").mkdir()
        for i, photo in enumerate(photos):
            photo.convert("RGB").resize((resolution, resolution)).save(tmp / "refs" / f"{i:02d}.png")

    write_bundle(concept, out, write)
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def models(workdir) -> tuple[Path, Path]:
    from lrkit.evaluation.tiny import save_tiny_metric_models

    return save_tiny_metric_models(workdir / "models")


@pytest.fixture(scope="module")
def concept_template(workdir, tiny_pipe) -> Path:
    photos = [Image.open(p) for p in sorted((ROOT / "data" / "subjects" / "vase").glob("*.jpg"))[:2]]
    return write_ti_concept(tiny_pipe(), workdir / "concept_template", "vase_ti", "vase", photos)


@pytest.fixture()
def fresh_concept(concept_template, tmp_path):
    """A copy of the bundle per run (layout-retouch stores the reference mask in the bundle)."""
    def make(where: Path | None = None) -> Path:
        target = (where or tmp_path) / "vase_ti"
        shutil.copytree(concept_template, target)
        return target

    return make


def eval_args(concept: Path, out: Path, models, *extra: str) -> list[str]:
    prompts = out.parent / f"{out.name}_prompts.txt"
    prompts.write_text(PROMPTS)
    return ["--concepts", str(concept), "--prompts", str(prompts), "--methods", "vanilla,layout-retouch",
            "--seeds", "0,1", "--out", str(out), "--clip_model", str(models[0]), "--dino_model", str(models[1]),
            "--options.num_inference_steps", "3", *extra]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def keys(rows: list[dict]) -> list[tuple]:
    return [(r["concept"], r["method"], int(r["prompt_index"]), int(r["seed"])) for r in rows]


EXPECTED_KEYS = sorted(("vase_ti", m, p, s) for m in ("vanilla", "layout-retouch") for p in (0, 1) for s in (0, 1))


@pytest.fixture(scope="module")
def single(workdir, concept_template, models) -> Path:
    """One in-process run (the reference for the other tests).

    With one torch thread, as the launched processes have (OMP_NUM_THREADS=1 in `env()`): CPU matmuls
    split over another number of threads sum in another order and differ in the last bits, which
    the byte-for-byte comparison with the two-process run would report.
    """
    concept = workdir / "single_concept" / "vase_ti"
    shutil.copytree(concept_template, concept)
    out = workdir / "single"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["eval", *eval_args(concept, out, models)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


# ------------------------------------------------------------------------------------ one process


def test_every_image_is_one_row_and_its_scores_recompute_from_the_files(single, concept_template, models):
    from lrkit.evaluation.metrics import ClipEmbedder, DinoEmbedder, mask_center

    rows = read_csv(single / "results.csv")
    assert sorted(keys(rows)) == EXPECTED_KEYS
    clip = ClipEmbedder.from_pretrained(models[0], device="cpu")
    dino = DinoEmbedder.from_pretrained(models[1], device="cpu")
    refs = sorted((concept_template / "refs").glob("*.png"))
    for row in rows[:: 3]:
        image = single / row["image"]
        assert image.is_file()
        assert row["prompt"] == ["a <vase_ti> vase on the beach", "a <vase_ti> vase in the snow"][int(row["prompt_index"])]
        plain = row["prompt"].replace("<vase_ti> ", "")  # CLIP-T reads the class word, not the token
        e, r = clip.embed_images([image]), clip.embed_images(refs)
        assert float(row["clip_i"]) == pytest.approx(float((e @ r.T).mean()), abs=1e-5)
        assert float(row["clip_t"]) == pytest.approx(float(e @ clip.embed_texts([plain]).T), abs=1e-5)
        d, dr = dino.embed_images([image]), dino.embed_images(refs)
        assert float(row["dino"]) == pytest.approx(float((d @ dr.T).mean()), abs=1e-5)
        if row["method"] == "layout-retouch":  # centres from the saved target masks
            mask = Image.open(str(image).replace(".png", "_mask.png"))
            assert (float(row["center_x"]), float(row["center_y"])) == pytest.approx(mask_center(mask))
        else:
            assert row["center_x"] == ""  # no attention mask without the retouch stage


def test_prompt_rows_and_the_table_aggregate_the_image_rows(single):
    rows = read_csv(single / "results.csv")
    prompts = read_csv(single / "prompts.csv")
    assert len(prompts) == 4
    for p in prompts:
        mine = [r for r in rows if (r["method"], r["prompt_index"]) == (p["method"], p["prompt_index"])]
        if p["method"] == "layout-retouch":
            c = np.array([[float(r["center_x"]), float(r["center_y"])] for r in mine])
            assert float(p["layout_var"]) == pytest.approx(c[:, 0].var() + c[:, 1].var(), abs=1e-12)
        else:
            assert p["layout_var"] == ""
    table = (single / "results.md").read_text()
    by_method = table.split("## By method")[1].split("##")[0]
    header = [h.strip() for h in by_method.strip().splitlines()[0].strip("|").split("|")]
    for method in ("vanilla", "layout-retouch"):
        line = next(l for l in by_method.splitlines() if l.startswith(f"| {method} |"))
        cells = dict(zip(header, (c.strip() for c in line.strip("|").split("|"))))
        mine = [r for r in rows if r["method"] == method]
        assert cells["images"] == "4"
        assert cells["CLIP-I"] == f"{np.mean([float(r['clip_i']) for r in mine]):.4f}"
        assert cells["DINO"] == f"{np.mean([float(r['dino']) for r in mine]):.4f}"
        var = [float(p["layout_var"]) for p in prompts if p["method"] == method and p["layout_var"]]
        assert cells["sigma2_avg"] == (f"{np.mean(var):.4f}" if var else "-")
    plots = sorted(p.name for p in (single / "plots").glob("*.png"))
    assert {"clip_i.png", "clip_t.png", "dino.png", "dino_div.png", "sigma2_avg.png"} <= set(plots)
    assert {"centers_vanilla.png", "centers_layout_retouch.png"} <= set(plots)


def test_a_finished_run_redoes_nothing(single, workdir, models, caplog):
    files = sorted(single.glob("images/**/*.png")) + sorted(single.glob("scores/**/*.json"))
    before = {p: p.stat().st_mtime_ns for p in files}
    caplog.set_level("INFO")
    assert main(["eval", *eval_args(workdir / "single_concept" / "vase_ti", single, models)]) == 0
    assert "0 of 4 units to do (4 already scored)" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert sorted(keys(read_csv(single / "results.csv"))) == EXPECTED_KEYS


def test_resuming_with_other_generation_settings_is_refused(single, workdir, models, capsys):
    args = eval_args(workdir / "single_concept" / "vase_ti", single, models)
    args[args.index("--options.num_inference_steps") + 1] = "4"
    assert main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert "other generation settings" in err and "options" in err and "--out" in err


def test_cli_errors_name_the_option(fresh_concept, tmp_path, models, capsys):
    concept = fresh_concept()
    out = tmp_path / "bad"
    assert main(["eval", *eval_args(concept, out, models), "--clip_model", "openai/clip-vit-base-patch32"]) == 2
    err = capsys.readouterr().err
    assert "'openai/clip-vit-base-patch32'" in err and "--clip_model ./clip-vit-base-patch32" in err
    assert not list(out.glob("images/**/*.png"))  # failed before generating anything
    assert main(["eval", *eval_args(concept, out, models), "--methods", "vanilla,sketchy"]) == 2
    assert "--methods" in capsys.readouterr().err
    assert main(["eval", *eval_args(concept, out, models), "--seeds", "two"]) == 2
    assert "--seeds" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ processes


@pytest.mark.slow
def test_a_killed_run_restarts_and_ends_with_every_row_once(fresh_concept, tmp_path, models):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lrkit.cli", "eval", *eval_args(fresh_concept(), out, models)]
    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(out.glob("scores/**/*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    scored = sorted(out.glob("scores/**/*.json"))
    assert scored, "no unit was scored before the kill"
    assert not (out / "results.csv").exists(), "the run finished before it could be killed"
    before = {p: p.stat().st_mtime_ns for p in scored + sorted(out.glob("images/**/p*_s?.png"))}

    assert main(cmd[cmd.index("eval"):]) == 0  # the restart, in-process
    assert sorted(keys(read_csv(out / "results.csv"))) == EXPECTED_KEYS
    assert all(p.stat().st_mtime_ns == t for p, t in before.items()), "finished work was redone"


@pytest.mark.slow
def test_two_processes_give_the_same_results_as_one(single, fresh_concept, tmp_path, models):
    # accelerate launch on a CPU starts two gloo processes through torch.distributed.run, so this covers
    # torchrun's environment too (`torchrun --nproc_per_node 2 -m lrkit.cli eval ...` works the same).
    out = tmp_path / "single"  # same folder name as the single run: the table names the prompt file
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "-m", "lrkit.cli"]
    proc = run([*cmd, "eval", *eval_args(fresh_concept(), out, models)])
    log = proc.stdout + proc.stderr
    assert "process 0/2: 2 of 2 units to do" in log and "process 1/2: 2 of 2 units to do" in log
    assert log.count("## By method") == 1  # merged once
    assert (out / "results.csv").read_text() == (single / "results.csv").read_text()
    assert (out / "results.md").read_text() == (single / "results.md").read_text()


# ------------------------------------------------------------------------------------ toy world


@pytest.mark.slow
def test_toy_base_adds_the_exact_toy_scores(tmp_path, models):
    from lrkit.models import load_base
    from lrkit.toyworld.scorers import layout_diversity, score_image
    from lrkit.toyworld.subjects import SUBJECTS
    from lrkit.toyworld.world import scene_of

    subject = SUBJECTS["toy_vase"]
    concept = write_ti_concept(load_base("toy"), tmp_path / "toy_vase", "toy_vase", "vase",
                               [s.image for s in subject.photos(2)])
    out = tmp_path / "toy"
    assert main(["eval", "--base", "toy", "--concepts", str(concept), "--prompts", "toy", "--max_prompts", "2",
                 "--methods", "vanilla,personalized", "--seeds", "3", "--out", str(out), "--clip_model", str(models[0]),
                 "--dino_model", str(models[1]), "--options.num_inference_steps", "8",
                 "--options.guidance_scale", "4"]) == 0
    rows = read_csv(out / "results.csv")
    assert len(rows) == 2 * 2 * 3
    for row in rows:
        plain = row["prompt"].replace("<toy_vase> ", "")
        record = score_image(Image.open(out / row["image"]).convert("RGB"), subject, scene_of(plain))
        assert row["scene"] == record["scene"] and row["scene_ok"] == str(record["scene_ok"])
        assert float(row["identity"]) == pytest.approx(record["identity"])
        assert row["is_subject"] == str(record["is_subject"])
        if record["center"] is None:
            assert row["center_x"] == ""
        else:
            assert (float(row["center_x"]), float(row["center_y"])) == pytest.approx(record["center"])
        assert row["clip_i"] and row["dino"]  # the embedding metrics run alongside
    table = (out / "results.md").read_text()
    assert "identity" in table and "scene rate" in table and "centres from toy masks" in table
    for method in ("vanilla", "personalized"):
        centers = {}
        for r in rows:
            if r["method"] == method and r["center_x"]:
                centers.setdefault(r["prompt_index"], []).append((float(r["center_x"]), float(r["center_y"])))
        centers = {k: v for k, v in centers.items() if len(v) >= 2}
        prompts = [p for p in read_csv(out / "prompts.csv") if p["method"] == method and p["layout_var"]]
        if centers:  # the runner's sigma^2 per prompt, averaged, is the toy world's layout_diversity
            mean = np.mean([float(p["layout_var"]) for p in prompts])
            assert mean == pytest.approx(layout_diversity(centers))


def test_an_sdxl_concept_is_evaluated_on_its_own_family(tmp_path, models):
    """The runner asks the concept's family: a reference concept on tiny-random-xl gets SDXL pipelines (the base
    recorded in the bundle) and every unit is scored."""
    from lrkit.concept import Concept
    from lrkit.reference import reference_concept

    concept = reference_concept(sorted((ROOT / "data" / "subjects" / "vase").glob("*.jpg"))[:2], "vase",
                                tmp_path / "vase_xl", base="tiny-random-xl")
    assert Concept.load(concept.path).base.family == "sdxl"
    out = tmp_path / "eval_xl"
    assert main(["eval", *eval_args(concept.path, out, models)]) == 0
    rows = read_csv(out / "results.csv")
    assert sorted(keys(rows)) == sorted(("vase_xl", m, p, s) for m in ("vanilla", "layout-retouch")
                                        for p in (0, 1) for s in (0, 1))
    assert all(float(r["clip_t"]) == float(r["clip_t"]) for r in rows)  # scored (not NaN)

"""Launching: resume after SIGKILL, and multi-process DDP under torchrun and accelerate launch.

These start real subprocesses (CPU, gloo); each takes 10-40 s.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import BIN, ROOT, env, kill_at_first_checkpoint, run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def photos(vase_photos) -> Path:
    return vase_photos(3)


def train_args(out: Path, photos: Path, *extra: str) -> list[str]:
    return [str(ROOT / "train/train.py"), "--config", str(ROOT / "configs/demo.yaml"), "--data.photos", str(photos),
            "--data.repeats", "1", "--validation.prompts", "[]", "--output_dir", str(out), *extra]


def lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "concept" / "pytorch_lora_weights.safetensors")


def assert_one_bundle(out: Path) -> None:
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".concept")]
    assert (out / "concept" / "concept.json").is_file() and not leftovers, leftovers


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, photos):
    steps = ["--max_steps", "12", "--lora.dropout", "0.1"]  # dropout: the global RNG must be restored too
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run([sys.executable, *train_args(straight, photos, *steps)])

    kill_at_first_checkpoint([sys.executable, *train_args(killed, photos, *steps)], killed, 12)

    resumed = run([sys.executable, *train_args(killed, photos, *steps)])
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr

    a, b = lora(straight), lora(killed)
    assert a.keys() == b.keys()  # no second adapter stacked on resume
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    assert_one_bundle(killed)


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_two_process_ddp_equals_one_process_with_twice_the_batch(tmp_path, photos, launcher):
    steps = ["--max_steps", "3", "--lora.dropout", "0.0"]
    single = tmp_path / "single"
    run([sys.executable, *train_args(single, photos, *steps, "--data.batch_size", "2")])

    ddp = tmp_path / "ddp"
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
    proc = run([*cmd, *train_args(ddp, photos, *steps, "--data.batch_size", "1")])
    log = proc.stdout + proc.stderr
    assert "rank 0/2 finished training at step 3" in log
    assert "rank 1/2 finished training at step 3" in log

    # Each rank saw one of the two samples a single process sees per step, gradients averaged:
    # the result equals the single-process run (up to reduction order).
    a, b = lora(single), lora(ddp)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    assert_one_bundle(ddp)


def fsdp_args(out: Path, photos: Path, *extra: str) -> list[str]:
    """The shipped sharded SDXL DreamBooth config on `tiny-random-xl`, sizes shrunk, at full precision (the
    comparisons below are against an unsharded run; bf16-mixed as shipped: tests/test_user_paths.py)."""
    return [str(ROOT / "train/train.py"), "--config", str(ROOT / "configs/train/sdxl_dreambooth_fsdp.yaml"),
            "--base", "tiny-random-xl", "--data.photos", str(photos), "--data.resolution", "64", "--data.repeats", "1",
            "--dreambooth.num_class_images", "2", "--dreambooth.class_inference_steps", "2", "--validation.prompts",
            "[]", "--optim.lr", "1e-4", "--precision", "32", "--checkpoint_every_n_epochs", "1", "--accelerator", "cpu",
            "--output_dir", str(out), *extra]


def unet_update(out: Path, base: dict[str, torch.Tensor]) -> torch.Tensor:
    trained = load_file(out / "concept" / "unet" / "diffusion_pytorch_model.safetensors")
    assert trained.keys() == base.keys()
    return torch.cat([(trained[k].float() - base[k].float()).flatten() for k in sorted(base)])


def test_fsdp_two_processes_equal_one_process_with_twice_the_batch_and_resume(tmp_path, photos):
    from lrkit.models import load_base

    single, sharded = tmp_path / "single", tmp_path / "sharded"
    run([sys.executable, *fsdp_args(single, photos, "--strategy", "auto", "--data.batch_size", "2",
                                    "--max_steps", "4")])
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    first = run([*torchrun, *fsdp_args(sharded, photos, "--max_steps", "2")])
    assert "rank 1/2 finished training at step 2" in first.stdout + first.stderr
    shutil.rmtree(sharded / "concept")  # the first run's bundle: the resumed run writes its own
    resumed = run([*torchrun, *fsdp_args(sharded, photos, "--max_steps", "4")])
    log = resumed.stdout + resumed.stderr
    assert "Restored all states from the checkpoint" in log and "rank 1/2 finished training at step 4" in log

    # Sharded over two ranks, each taking one of the two samples a single process takes per step, and resumed
    # half-way (sharded AdamW state written and read back): the same update as the single process, up to
    # reduction order (AdamW normalises each gradient, so a near-zero one may flip sign: compare the whole update).
    base = load_base("tiny-random-xl").unet.state_dict()
    a, b = unet_update(single, base), unet_update(sharded, base)
    assert b.norm() > 0.5 * a.norm() > 0
    assert (a - b).norm() < 1e-3 * a.norm(), ((a - b).norm() / a.norm()).item()
    assert_one_bundle(sharded)

    # its checkpoint's optimizer state is ordered as the sharded model: resuming it unsharded is refused
    proc = subprocess.run([sys.executable, *fsdp_args(sharded, photos, "--strategy", "auto", "--max_steps", "6",
                                                        "--overwrite", "true")],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "strategy" in proc.stderr, proc.stderr[-2000:]

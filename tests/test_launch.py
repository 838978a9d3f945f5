"""Launching: resume after SIGKILL, and multi-process DDP under torchrun and accelerate launch.

These start real subprocesses (CPU, gloo); each takes 10-40 s.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launching import BIN, ROOT, env, run

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

    proc = subprocess.Popen([sys.executable, *train_args(killed, photos, *steps)], env=env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "no checkpoint was written before the kill"
    assert not (killed / "concept").exists(), "the run finished before it could be killed"
    step_at_kill = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step_at_kill < 12

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

"""What the tests that start lrkit in child processes share (torchrun, accelerate launch, SIGKILL runs)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's launchers (accelerate, torchrun)


def env() -> dict:
    """The child's environment: one OpenMP thread, offline, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository root; fail with the tail of its output unless it exits 0."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def kill_at_first_checkpoint(cmd: list[str], out: Path, max_steps: int) -> int:
    """Start `cmd` (a training run into OUT), SIGKILL it once OUT/checkpoints/last.ckpt exists, and return the
    checkpoint's step; asserts it was killed mid-run (a checkpoint written, no bundle yet)."""
    import signal
    import time

    import torch

    proc = subprocess.Popen(cmd, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = out / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoint.exists(), "no checkpoint was written before the kill"
    assert not (out / "concept").exists(), "the run finished before it could be killed"
    step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 0 < step < max_steps
    return step

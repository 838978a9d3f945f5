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

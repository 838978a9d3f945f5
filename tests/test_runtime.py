"""`lrkit.runtime`: the OpenMP settings lrkit makes when it is imported before torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = ("import json, os, sys\n{first}\nimport torch\n"
         "print(json.dumps({{k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS')}}))")


def _probe(first: str, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], env={**environment, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_importing_lrkit_first_makes_openmp_wait_passively():
    assert _probe("import lrkit")["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.slow
def test_a_policy_the_user_set_is_kept():
    assert _probe("import lrkit", OMP_WAIT_POLICY="ACTIVE")["OMP_WAIT_POLICY"] == "ACTIVE"


@pytest.mark.slow
def test_nothing_is_set_once_torch_is_loaded():
    assert _probe("import torch\nimport lrkit")["OMP_WAIT_POLICY"] is None


def test_the_lrkit_command_runs_with_the_setting():
    code = "import os, sys\nfrom lrkit.cli import main\nprint(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}).stdout
    assert out.strip().splitlines()[-1] == "PASSIVE"


def test_usable_cores_respects_the_affinity_mask():
    from lrkit.runtime import usable_cores

    assert 1 <= usable_cores() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("base, device, expected", [
    ("toy", "cpu", 1), ("tiny-random:3", "cpu", 1), ("toy+my-dreambooth", "cpu", 1),
    ("toy", "cuda", None), ("stable-diffusion-v1-5/stable-diffusion-v1-5", "cpu", None), ("/models/toy", "cpu", None),
])
def test_built_in_bases_run_on_one_cpu_thread_for_the_job(base, device, expected, monkeypatch):
    import torch

    from lrkit import runtime

    monkeypatch.setattr(runtime, "_USER_THREADS", False)
    before = torch.get_num_threads()
    if before == 1:
        torch.set_num_threads(2)
    try:
        start = torch.get_num_threads()
        with runtime.cpu_threads_for(base, device):
            inside = torch.get_num_threads()
        assert inside == (expected or start)
        assert torch.get_num_threads() == start  # restored
    finally:
        torch.set_num_threads(before)


def test_a_thread_count_the_user_set_is_kept(monkeypatch):
    import torch

    from lrkit import runtime

    monkeypatch.setattr(runtime, "_USER_THREADS", True)
    start = torch.get_num_threads()
    with runtime.cpu_threads_for("toy", "cpu"):
        assert torch.get_num_threads() == start

"""`lrkit push` (lrkit.hub): a bundle is validated as `Concept.load` validates it, then uploaded with huggingface_hub's
`HfApi.create_repo(exist_ok=True)` and `upload_folder`. The Hub is not reachable from the test machines: the calls
are recorded by a stand-in HfApi, and the offline failures are checked as the user sees them (one line, exit 2)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lrkit.cli import main
from lrkit.concept import MANIFEST, ConceptError

ROOT = Path(__file__).resolve().parents[1]


class RecordingApi:
    """Stands in for `huggingface_hub.HfApi`: records each call and what `upload_folder` would send."""

    calls: list = []

    def __init__(self, endpoint=None, token=None):
        RecordingApi.calls.append(("HfApi", {"endpoint": endpoint, "token": token}))

    def create_repo(self, repo_id, **kwargs):
        from huggingface_hub import RepoUrl

        RecordingApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        RecordingApi.calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(kwargs["folder_path"])
        everything = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        sent = sorted(filter_repo_objects(everything, allow_patterns=kwargs.get("allow_patterns"),
                                          ignore_patterns=kwargs.get("ignore_patterns")))
        RecordingApi.calls.append(("upload_folder", {**kwargs, "sent": sent}))
        return type("Commit", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/abc"})()


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub out of the offline mode the test suite starts it in (tests/conftest.py)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def api(monkeypatch, online):
    import huggingface_hub

    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    return RecordingApi


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from lrkit.reference import reference_concept

    out = tmp_path_factory.mktemp("push") / "my-vase"
    return reference_concept(ROOT / "data/subjects/vase/00.jpg", "vase", out, base="tiny-random").path


def test_push_creates_the_repository_and_uploads_the_bundle(api, bundle, capsys):
    (bundle / ".DS_Store").write_bytes(b"finder")  # hidden files stay home
    try:
        assert main(["push", str(bundle), "--repo-id", "me/my-vase", "--token", "hf_secret"]) == 0
    finally:
        (bundle / ".DS_Store").unlink()
    names = [name for name, _ in api.calls]
    assert names == ["HfApi", "create_repo", "upload_folder"]
    calls = dict(api.calls)
    assert calls["HfApi"]["token"] == "hf_secret"
    assert calls["create_repo"] == {"repo_id": "me/my-vase", "repo_type": "model", "private": None, "exist_ok": True}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "me/my-vase" and upload["repo_type"] == "model" and upload["revision"] is None
    assert Path(upload["folder_path"]) == bundle.resolve()
    refs = json.loads((bundle / MANIFEST).read_text())["refs"]
    assert upload["sent"] == sorted(["README.md", MANIFEST, *refs])
    out = capsys.readouterr().out
    assert "uploaded 3 file(s) (1 reference photo(s) in refs/) to me/my-vase" in out and "hf_secret" not in out


def test_private_and_revision_reach_the_hub_calls(api, bundle):
    from lrkit.hub import push

    result = push(bundle, "me/my-vase", private=True, revision="v2", token="hf_x")
    calls = dict(api.calls)
    assert calls["create_repo"]["private"] is True
    assert calls["create_branch"] == {"repo_id": "me/my-vase", "branch": "v2", "repo_type": "model", "exist_ok": True}
    assert calls["upload_folder"]["revision"] == "v2"
    assert result.repo_id == "me/my-vase" and result.url.endswith("/commit/abc") and "README.md" in result.files


def test_a_bundle_load_refuses_is_never_uploaded(api, bundle, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["refs"] = ["../../etc/passwd"]
    (bad / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConceptError, match="outside the bundle"):
        from lrkit.hub import push

        push(bad, "me/bad")
    assert main(["push", str(bad), "--repo-id", "me/bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrkit push: error: ") and "outside the bundle" in err[0]
    assert api.calls == []


def test_a_bad_repository_id_is_one_line(api, bundle, capsys):
    assert main(["push", str(bundle), "--repo-id", "me/not a name"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lrkit push: error: --repo-id 'me/not a name' is not a Hub repository")
    assert api.calls == []


@pytest.mark.parametrize("status, says", [(401, "refused the token"), (403, "refused the token"),
                                          (409, "refused the upload")])
def test_hub_refusals_are_one_line(api, bundle, monkeypatch, capsys, status, says):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    def refuse(self, repo_id, **kwargs):
        response = httpx2.Response(status, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))
        raise HfHubHTTPError(f"{status} Client Error", response=response)

    monkeypatch.setattr(RecordingApi, "create_repo", refuse)
    assert main(["push", str(bundle), "--repo-id", "me/my-vase"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and f"{status} Client Error" in err[0]


def test_no_token_is_one_line(api, bundle, monkeypatch, capsys):
    from huggingface_hub.errors import LocalTokenNotFoundError

    def no_token(self, repo_id, **kwargs):
        raise LocalTokenNotFoundError("Token is required")

    monkeypatch.setattr(RecordingApi, "create_repo", no_token)
    assert main(["push", str(bundle), "--repo-id", "me/my-vase"]) == 2
    assert capsys.readouterr().err.strip() == ("lrkit push: error: no Hugging Face token: pass --token, set HF_TOKEN, "
                                               "or log in with `hf auth login`")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_hub_is_one_line(bundle, online, monkeypatch, capsys):
    """The real HfApi against an address nothing listens on: what an offline machine shows."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    assert main(["push", str(bundle), "--repo-id", "me/my-vase", "--token", "hf_x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"lrkit push: error: cannot reach the Hugging Face Hub at {endpoint} (")
    assert err[0].endswith("); check your network or HF_ENDPOINT")


def test_offline_mode_is_named(bundle, api, monkeypatch, capsys):
    """HF_HUB_OFFLINE=1 set before lrkit starts, as a user sets it: one line that names it, exit code 2; the same
    when it is set later in the process. Nothing is asked of the Hub."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "yes")
    assert main(["push", str(bundle), "--repo-id", "me/my-vase"]) == 2
    assert capsys.readouterr().err.strip() == ("lrkit push: error: cannot reach the Hugging Face Hub: "
                                               "HF_HUB_OFFLINE=yes is set (offline mode); unset it to push")
    assert api.calls == []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "lrkit.cli", "push", str(bundle), "--repo-id", "me/my-vase"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    line = "cannot reach the Hugging Face Hub: HF_HUB_OFFLINE=1 is set (offline mode); unset it to push"
    assert proc.stderr.strip().splitlines() == [f"lrkit push: error: {line}"]

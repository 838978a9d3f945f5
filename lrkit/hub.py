"""`lrkit push`: upload a concept bundle to the Hugging Face Hub as a model repository.

The bundle is validated exactly as `Concept.load` validates it (a bundle that lrkit would refuse to load is never
uploaded), then `huggingface_hub` creates the repository if needed (`HfApi.create_repo(exist_ok=True)`) and uploads
the folder in one commit (`HfApi.upload_folder`): manifest, weights, model card, `refs/` (the training photos)
and `masks/`. Every failure is a `HubError` whose message says what to do: no network or offline mode, no token,
a refused token, a refused repository name.
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lrkit.bundle_checks import CARD

logger = logging.getLogger(__name__)

IGNORED = [".*", "**/.*"]
"""Hidden files and folders (editor and OS leftovers, temporary files) stay out of the upload."""


class HubError(RuntimeError):
    """A push that could not be done; the message says why and what to do."""


@dataclass
class PushResult:
    """What `push` uploaded: the repository, its revision, the commit's URL and the files (relative paths)."""

    repo_id: str
    revision: str | None
    url: str
    files: list[str] = field(default_factory=list)


def hub_endpoint() -> str:
    """The Hub address huggingface_hub talks to (`HF_ENDPOINT`, else https://huggingface.co)."""
    from huggingface_hub import constants

    return os.environ.get("HF_ENDPOINT") or constants.ENDPOINT


def _offline_env() -> str | None:
    """The value of `HF_HUB_OFFLINE` when it turns offline mode on (as huggingface_hub reads it), else None."""
    value = os.environ.get("HF_HUB_OFFLINE")
    return value if value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE") else None


def offline_mode() -> bool:
    """Whether huggingface_hub will not use the network: `HF_HUB_OFFLINE` set now, or when it was imported."""
    from huggingface_hub import constants

    return _offline_env() is not None or bool(constants.HF_HUB_OFFLINE)


def _network_errors() -> tuple[type[BaseException], ...]:
    """The exceptions of a Hub that cannot be reached: connection and timeout errors of Python and of the HTTP
    library huggingface_hub uses (httpx2 or httpx; requests in older versions). huggingface_hub's
    `OfflineModeIsEnabled` is a `ConnectionError`."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            loaded = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(loaded, name) for name in names if isinstance(getattr(loaded, name, None), type)]
    return tuple(errors)


def unreachable_message(err: BaseException | None = None) -> str:
    """The one line for a Hub that cannot be reached (or offline mode)."""
    if offline_mode():
        value = _offline_env()
        setting = f"HF_HUB_OFFLINE={value} is set" if value is not None else "HF_HUB_OFFLINE was set at start"
        return f"cannot reach the Hugging Face Hub: {setting} (offline mode); unset it to push"
    reason = f"{type(err).__name__}: {err}" if err is not None else "no connection"
    return (f"cannot reach the Hugging Face Hub at {hub_endpoint()} ({reason}); check your network or "
            "HF_ENDPOINT")


def bundle_files(root: Path) -> list[str]:
    """The files `upload_folder` sends from the bundle folder `root`: every file (symlinks inside the folder are
    sent as the files they point to), hidden ones left out, as sorted relative POSIX paths."""
    files = []
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                files.append(path.relative_to(root).as_posix())
    return sorted(files)


def push(bundle: "str | os.PathLike", repo_id: str, *, private: bool = False, token: str | None = None,
         revision: str | None = None, commit_message: str | None = None) -> PushResult:
    """Upload the concept bundle folder `bundle` to the Hub model repository `repo_id` (`owner/name`, or `name` in
    the token's own namespace), creating it (public unless `private`, or as the owner's settings say) when it does
    not exist.

    `token`: a Hugging Face token with write access (default: `HF_TOKEN` or the one `hf auth login` stored).
    `revision`: a branch to commit to (created from the default branch if missing; default: the default branch).
    Raises `ConceptError` for a bundle `Concept.load` refuses (before any network access), `HubError` for what the
    Hub side refuses or cannot do."""
    from lrkit.concept import Concept

    concept = Concept.load(bundle)  # the same checks as loading, before anything leaves the machine
    root = concept.path
    assert root is not None
    if not (root / CARD).is_file():
        logger.warning("%s has no model card (%s), so the repository gets none; bundles lrkit writes now carry one "
                       "(write it again: lrkit export, lrkit reference --overwrite)", root, CARD)
    if offline_mode():
        raise HubError(unreachable_message())
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalTokenNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise HubError(f"--repo-id {repo_id!r} is not a Hub repository id ({err})") from None
    api = HfApi(endpoint=hub_endpoint(), token=token)
    files = bundle_files(root)
    try:
        repo = api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True)
        target = getattr(repo, "repo_id", None) or repo_id
        if revision:
            api.create_branch(target, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(repo_id=target, folder_path=str(root), repo_type="model", revision=revision,
                                   commit_message=commit_message or f"Upload lrkit concept {concept.name}",
                                   ignore_patterns=IGNORED)
    except LocalTokenNotFoundError:
        raise HubError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with `hf auth login`") from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if status in (401, 403):
            raise HubError(f"the Hub refused the token for {repo_id!r} ({first}); pass a token with write access "
                           "(--token, HF_TOKEN or `hf auth login`)") from None
        raise HubError(f"the Hub refused the upload to {repo_id!r} ({first})") from None
    except _network_errors() as err:
        raise HubError(unreachable_message(err)) from None
    url = str(getattr(commit, "commit_url", None) or getattr(repo, "url", None) or repo_id)
    return PushResult(repo_id=target, revision=revision, url=url, files=files)


def cli(argv: list[str]) -> int:
    """`lrkit push BUNDLE --repo-id NAME [--private] [--token T] [--revision BRANCH]`."""
    from lrkit.argparsing import plain_argument_parser

    parser = plain_argument_parser(
        prog="lrkit push",
        description="Upload a concept bundle (weights, model card, reference photos) to the Hugging Face Hub as a "
                    "model repository. The bundle is checked as `lrkit generate` would load it first.",
    )
    parser.add_argument("bundle", help="the concept bundle folder (e.g. outputs/my-dog/concept)")
    parser.add_argument("--repo-id", "--repo_id", dest="repo_id", required=True,
                        help="the model repository, owner/name (created if it does not exist)")
    parser.add_argument("--private", action="store_true", help="create the repository private (a new one only)")
    parser.add_argument("--token", default=None,
                        help="a token with write access (default: HF_TOKEN or the `hf auth login` one)")
    parser.add_argument("--revision", default=None, help="the branch to commit to (created if missing; "
                        "default: the repository's default branch)")
    args = parser.parse_args(argv)
    result = push(args.bundle, args.repo_id, private=args.private, token=args.token, revision=args.revision)
    refs = sum(1 for f in result.files if f.startswith("refs/"))
    print(f"uploaded {len(result.files)} file(s) ({refs} reference photo(s) in refs/) to {result.repo_id}: "
          f"{result.url}")
    return 0


__all__ = ["HubError", "PushResult", "bundle_files", "push"]

"""Concept bundles as zip files: written for download, and unpacked safely when someone uploads one.

`unpack_zip` treats the archive as hostile: every entry name must be a plain relative path (no absolute path, no
drive, no `..`, no backslash, no NUL), no entry may be a symlink or another special file, encrypted entries and
duplicate names are refused, and the entry count and the unpacked size are limited — the sizes the archive
declares and the bytes actually read (an entry yielding more than it declares is refused while it is read).
Everything is written into a fresh folder the caller names; on any refusal that folder is removed, so nothing is
left half unpacked. Whether the result is a valid bundle is then `Concept.load`'s question.
"""

from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lrkit.bundle_checks import MANIFEST


class ZipError(ValueError):
    """A refused zip file; the message names the entry and the rule."""


@dataclass(frozen=True)
class ZipLimits:
    """How large an uploaded bundle zip may be."""

    max_zip_bytes: int = 8 << 30
    """The zip file itself."""
    max_unpacked_bytes: int = 16 << 30
    """All entries together, unpacked (a DreamBooth SDXL bundle in float32 is about 14 GB)."""
    max_entries: int = 10_000
    """Files and folders in the archive."""


CHUNK = 1 << 20


def _entry_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The entry's name as a safe relative path, or `ZipError` saying why it is not one."""
    name = info.filename
    shown = repr(name[:200])
    if "\x00" in name or "\\" in name:
        raise ZipError(f"entry {shown} holds a backslash or NUL; a bundle zip uses plain '/' paths")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise ZipError(f"entry {shown} is an absolute path; every entry must stay inside the bundle folder")
    parts = [p for p in name.rstrip("/").split("/")]
    if any(p in ("", ".", "..") for p in parts):
        raise ZipError(f"entry {shown} has an empty, '.' or '..' part; every entry must stay inside the bundle folder")
    return PurePosixPath(*parts)


def _entry_kind(info: zipfile.ZipInfo) -> str:
    """'dir' or 'file'; `ZipError` for symlinks, devices, FIFOs and encrypted entries."""
    if info.flag_bits & 0x1:
        raise ZipError(f"entry {info.filename!r} is encrypted; export the bundle without a password")
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        raise ZipError(f"entry {info.filename!r} is a symlink; a bundle zip holds only files and folders")
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise ZipError(f"entry {info.filename!r} is a special file (mode {oct(mode)}); a bundle zip holds only files "
                       "and folders")
    return "dir" if info.is_dir() or kind == stat.S_IFDIR else "file"


def check_zip(path: str | os.PathLike,
              limits: ZipLimits = ZipLimits()) -> list[tuple[zipfile.ZipInfo, PurePosixPath, str]]:
    """Every entry of the zip at `path` as (info, safe path, kind), after checking names, kinds, count and declared
    sizes; `ZipError` names the first problem."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_zip_bytes:
        raise ZipError(f"the zip is {size / 2**20:.0f} MiB; at most {limits.max_zip_bytes / 2**20:.0f} MiB")
    if not zipfile.is_zipfile(path):
        raise ZipError("not a zip file; upload a bundle zip (as the Concepts tab downloads them)")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ZipError(f"the zip cannot be read ({err})") from err
    if len(infos) > limits.max_entries:
        raise ZipError(f"the zip holds {len(infos)} entries; at most {limits.max_entries}")
    entries, seen, total = [], {}, 0
    for info in infos:
        safe, kind = _entry_path(info), _entry_kind(info)
        key = safe.as_posix()
        if key in seen and not (kind == "dir" and seen[key] == "dir"):
            raise ZipError(f"entry {info.filename!r} appears twice; a bundle zip names each file once")
        seen[key] = kind
        total += info.file_size if kind == "file" else 0
        if total > limits.max_unpacked_bytes:
            raise ZipError(f"the zip unpacks to more than {limits.max_unpacked_bytes / 2**20:.0f} MiB")
        entries.append((info, safe, kind))
    if not entries:
        raise ZipError("the zip is empty")
    return entries


def unpack_zip(path: str | os.PathLike, dest: str | os.PathLike, limits: ZipLimits = ZipLimits()) -> Path:
    """Unpack the bundle zip at `path` into the new folder `dest` and return the bundle folder in it: `dest` itself
    when concept.json is at the top of the archive, else the archive's one top folder holding it.

    `dest` must not exist; on any error it is removed again (`ZipError` names the entry and the rule)."""
    entries = check_zip(path, limits)
    dest = Path(dest)
    dest.mkdir(parents=False, exist_ok=False)
    try:
        budget = limits.max_unpacked_bytes
        with zipfile.ZipFile(path) as archive:
            for info, safe, kind in entries:
                target = dest.joinpath(*safe.parts)
                if kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                budget -= _copy_entry(archive, info, target)
                if budget < 0:
                    raise ZipError(f"the zip unpacks to more than {limits.max_unpacked_bytes / 2**20:.0f} MiB")
        return _bundle_folder(dest, [safe for _, safe, _ in entries])
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> int:
    """Stream one entry into a new file (never over an existing one); refuse more bytes than it declares."""
    written = 0
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "wb") as out, archive.open(info) as src:
            while block := src.read(CHUNK):
                written += len(block)
                if written > info.file_size:
                    raise ZipError(f"entry {info.filename!r} unpacks to more bytes than it declares "
                                   f"({info.file_size}); the zip is damaged or crafted")
                out.write(block)
    except ZipError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as err:
        raise ZipError(f"entry {info.filename!r} cannot be unpacked ({err})") from err
    return written


def _bundle_folder(dest: Path, paths: list[PurePosixPath]) -> Path:
    if (dest / MANIFEST).is_file():
        return dest
    tops = {p.parts[0] for p in paths}
    if len(tops) == 1 and (dest / next(iter(tops)) / MANIFEST).is_file():
        return dest / next(iter(tops))
    raise ZipError(f"no {MANIFEST} at the top of the zip or in its one top folder; is it a concept bundle?")


def zip_bundle(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the bundle folder as a zip at `out` (atomically): every file under one top folder named after the
    bundle folder, in sorted order. Symlinks inside the bundle are stored as the files they point to."""
    import tempfile

    folder, out = Path(folder), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


__all__ = ["ZipError", "ZipLimits", "check_zip", "unpack_zip", "zip_bundle"]

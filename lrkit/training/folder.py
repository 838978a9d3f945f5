"""The training folder (OUTPUT_DIR): its lock, the record of what trains there, and its metrics log.

- One run writes into a folder at a time: `folder_lock` holds an exclusive `flock` on OUTPUT_DIR/.lock (with the
  holder's pid in it) while the run writes; the kernel drops it when the process ends, killed or not.
- A run resumes only from a checkpoint trained from the same inputs: `training_inputs` lists what decides the
  weights a run learns, every checkpoint carries it (`InputsRecord`), and `check_resume` compares it before
  training starts. OUTPUT_DIR/run.json holds the same record, readable.
- A resumed run appends to OUTPUT_DIR/logs/metrics.csv (`MetricsLogger`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from lrkit.io import atomic_write_json
from lrkit.records import differences, inputs_digest, short_value
from lrkit.training.buckets import buckets_for
from lrkit.training.config import TrainConfig
from lrkit.training.options import TrainingError

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RECORD_FILE = "run.json"
RECORD_FORMAT = "lrkit.training-run/1"
FRESH_START = "pass another --output_dir, or --resume null to train afresh here (its checkpoints are then replaced)"


# ------------------------------------------------------------------------------------------------ the lock


def launch_rank() -> int:
    """0 in the process of global rank 0 as a launcher (torchrun, accelerate, Lightning, SLURM) set it, or in a
    process started alone; a positive number in every other rank."""
    for name in ("RANK", "SLURM_PROCID"):
        if name in os.environ:
            return int(os.environ[name])
    return int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", 0)))


@contextlib.contextmanager
def folder_lock(output_dir: "str | os.PathLike") -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` (created if missing) while the body runs.

    Raises `TrainingError` naming the holder's pid when another process holds it. Only the process of global
    rank 0 locks: the other ranks of a distributed run belong to its run. Without `fcntl` (Windows) nothing is
    locked.
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is None or launch_rank() != 0:
        yield
        return
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise TrainingError(f"output_dir {str(folder)!r} is in use by another training run (pid {holder}); "
                                "wait for it to finish, or pass another --output_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the lock itself goes with the descriptor
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ the inputs


def photos_digest(photos) -> str:
    """SHA-256 over the training photos in order: each one's name, caption and file bytes (a dataset row's pixels)."""
    h = hashlib.sha256()
    for photo in photos:
        h.update(f"{photo.name}\0{photo.caption}\0".encode())
        if photo.path is not None:
            with open(photo.path, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        else:
            h.update(f"{photo.image.mode}{photo.image.size}".encode())
            h.update(photo.image.tobytes())
        h.update(b"\n")
    return h.hexdigest()


def training_inputs(config: TrainConfig, photos) -> dict:
    """What decides the weights a run learns, besides the base model: the photos, the data options that make
    samples of them, the method and every options group it reads, the optimizer, the loss options and the seed;
    and whether it is sharded (`strategy: fsdp`), which lays out the checkpoint's optimizer state otherwise.

    The buckets are recorded as what they decide, each photo's bucket (`BucketPlan.record`), so bucket options that
    move no photo may change. Options that are off (no buckets, no caption dropout or shuffling) are recorded as
    None, as a record written before they existed reads them.

    Left out, so a resume may change them: max_steps (raise it to train on), precision, devices and the like,
    caching, logging, checkpoint frequency, validation images, names and paths.
    """
    data, options = config.data, config.to_dict()
    optim = dict(options["optim"], lr=config.optim.lr or config.method_class.default_lr)  # the lr in effect
    buckets = buckets_for(config, photos)
    inputs = {
        "photos": photos_digest(photos),
        "data": {"class_word": data.class_word, "token": config.token, "caption_template": data.caption_template,
                 "resolution": data.resolution, "center_crop": data.center_crop, "random_flip": data.random_flip,
                 "repeats": data.repeats, "batch_size": data.batch_size,
                 "buckets": buckets.record() if buckets is not None else None,
                 "caption_dropout": data.caption_dropout or None,
                 "shuffle_caption": data.shuffle_caption or None,
                 "keep_tokens": data.keep_tokens if data.shuffle_caption else None},
        "method": config.method,
        "optim": optim,
        "seed": config.seed,
        "min_snr_gamma": config.min_snr_gamma,
        "noise_offset": config.noise_offset,
    }
    for group in config.method_class.option_groups(config):
        inputs[group] = options[group]
    if config.strategy == "fsdp":  # its checkpoints order the optimizer state as the sharded model does
        inputs["strategy"] = "fsdp"
    return json.loads(json.dumps(inputs))  # plain JSON values, as a checkpoint gives them back


def base_record(fingerprint) -> dict:
    """The base model's fingerprint as plain values."""
    return {"id": fingerprint.id, "unet_config_sha256": fingerprint.unet_config_sha256,
            "weight_probe": list(fingerprint.weight_probe)}


class InputsRecord(L.Callback):
    """Carries the run's inputs (`training_inputs`) and base (`base_record`) in every checkpoint."""

    def __init__(self, inputs: dict, base: dict):
        self.record = {"inputs": inputs, "base": base}

    def state_dict(self) -> dict:
        return self.record

    def load_state_dict(self, state_dict: dict) -> None:
        pass  # `check_resume` compared it with this run's before training started


def write_record(output_dir: "str | os.PathLike", inputs: dict, base: dict) -> Path:
    """OUTPUT_DIR/run.json: the inputs of the run training there, and their digest."""
    return atomic_write_json(Path(output_dir) / RECORD_FILE, {
        "format": RECORD_FORMAT, "digest": inputs_digest(inputs), "inputs": inputs, "base": base})


def read_checkpoint(checkpoint: "str | os.PathLike") -> tuple[dict | None, int]:
    """The record (`InputsRecord`) a checkpoint carries (None when it carries none) and its step."""
    try:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)  # mmap: weights stay on disk
    except Exception as err:
        raise TrainingError(f"checkpoint {str(checkpoint)!r} cannot be read ({err}); {FRESH_START}") from err
    if not isinstance(ckpt, dict):
        raise TrainingError(f"checkpoint {str(checkpoint)!r} is not an lrkit training checkpoint; {FRESH_START}")
    record = (ckpt.get("callbacks") or {}).get(InputsRecord.__qualname__)
    record = record if isinstance(record, dict) and isinstance(record.get("inputs"), dict) else None
    return record, int(ckpt.get("global_step", 0))


def check_resume(checkpoint: "str | os.PathLike", record: dict | None, inputs: dict, base: dict | None = None) -> None:
    """Raise `TrainingError` listing what differs between the checkpoint's `record` and this run's `inputs`
    (and `base`, when given: compared as `BaseFingerprint.matches` does)."""
    from lrkit.models import BaseFingerprint

    if record is None:
        logger.warning("checkpoint %s records no training inputs; resuming without checking them", checkpoint)
        return
    changes = differences(record["inputs"], inputs)
    if base is not None and isinstance(record.get("base"), dict):
        try:
            same = BaseFingerprint(**record["base"]).matches(BaseFingerprint(**base))
        except TypeError:
            same = False
        if not same:
            changes.append(f"base: {short_value(record['base'].get('id'))} -> {short_value(base['id'])} (another model)")
    if changes:
        raise TrainingError(f"checkpoint {str(checkpoint)!r} was trained from other inputs ({'; '.join(changes)}); "
                            f"to resume it, restore those settings; otherwise {FRESH_START}")


# ------------------------------------------------------------------------------------------------ metrics


class _AppendingWriter(ExperimentWriter):
    """Lightning's metrics writer, keeping the rows already in metrics.csv of the steps before `resume_step` (the
    later ones are trained again) and appending to them."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            reader = csv.DictReader(file)
            rows = list(reader)
            header = list(reader.fieldnames or [])
        kept = [row for row in rows if _step(row) < self.resume_step]
        if len(kept) < len(rows):
            with self._fs.open(self.metrics_file_path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
        self.metrics_keys = sorted(header)  # new columns rewrite the file with the old rows (Lightning's `save`)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0


class MetricsLogger(CSVLogger):
    """OUTPUT_DIR/logs/metrics.csv (and hparams.yaml), as Lightning's `CSVLogger` writes them. With `resume_step`
    (a resumed run) the rows of the steps before it stay and the new ones follow; without, the file starts anew."""

    def __init__(self, output_dir: "str | os.PathLike", *, resume_step: int | None = None):
        super().__init__(output_dir, name="logs", version="")
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            if self.resume_step is None:
                self._experiment = ExperimentWriter(log_dir=self.log_dir)
            else:
                self._experiment = _AppendingWriter(self.log_dir, self.resume_step)
        return self._experiment

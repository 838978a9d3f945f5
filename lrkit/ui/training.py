"""Training runs of the web app: each one a child process (`lrkit.ui.worker`) calling `train_concept`.

A child process keeps the app's own process free while a run trains, gives the run its device memory back
when it ends, and makes Cancel exact: the process (group) is ended, its training folder jobs/<id>/ removed, and
nothing reaches concepts/. A run that finishes has its bundle renamed from jobs/<id>/concept to
concepts/<name> (its checkpoints are removed; its logs and validation images stay in jobs/<id>/).

`TrainingJob.updates` yields the run's state as it goes: steps, the loss of each step, validation images as they
are written, warnings, and at the end the published bundle or the error. A run whose page goes away (a closed tab,
a dropped SSH tunnel) goes on unattended: its bundle is published, or its folder removed, when it ends, and it holds
the `DeviceSlot` until then, so the next job on the device waits for it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

logger = logging.getLogger(__name__)

CANCEL_GRACE_S = 5.0
"""How long a cancelled run has to end after SIGTERM before it is killed."""
_RUNNING: set["TrainingJob"] = set()


class TrainingFailed(RuntimeError):
    """A training run ended with an error; `user_error` tells a refused input from a bug."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


@dataclass
class TrainingState:
    """What the page shows of a run."""

    step: int = 0
    total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    validation: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finished: bool = False
    cancelled: bool = False
    bundle: Path | None = None

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class DeviceSlot:
    """One job at a time on the device. Gradio's queue runs one heavy event at a time; this lock also covers a
    training that goes on after its page went away (it holds the slot until its process ends)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.holder = ""

    def acquire(self, what: str, blocking: bool = True) -> bool:
        if not self._lock.acquire(blocking=blocking):
            return False
        self.holder = what
        return True

    def release(self) -> None:
        self.holder = ""
        self._lock.release()


class TrainingJob:
    """One run: `config` (a training config dict whose output_dir is `job_dir`) trained in a child process, its
    bundle published as `destination`. `on_end` is called once, after the run has ended and been published or
    removed (attended or not). `worker` is the child's command (default `python -m lrkit.ui.worker`); it is given
    REQUEST EVENTS_FD and speaks the protocol of `lrkit.ui.worker`."""

    def __init__(self, config: dict, job_dir: Path, destination: Path, on_end: Callable[[], None] = lambda: None,
                 worker: list[str] | None = None):
        self.config, self.job_dir, self.destination = config, Path(job_dir), Path(destination)
        self.worker = worker or [sys.executable, "-m", "lrkit.ui.worker"]
        self.state = TrainingState(total=int(config.get("max_steps", 0)))
        self.attended = True
        self._on_end = on_end
        self._events: queue.Queue = queue.Queue()
        self._process: subprocess.Popen | None = None
        self._cancel = threading.Event()
        self._result: dict | None = None
        self._ended = False  # the child closed its end of the event pipe

    # -------------------------------------------------------------- the child

    def start(self) -> None:
        self.job_dir.mkdir(parents=True, exist_ok=False)
        request = self.job_dir / "request.json"
        request.write_text(json.dumps({"config": self.config}, indent=1), encoding="utf-8")
        read_fd, write_fd = os.pipe()
        with open(self.job_dir / "worker.log", "wb") as log:
            self._process = subprocess.Popen(
                [*self.worker, str(request), str(write_fd)], pass_fds=(write_fd,),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(write_fd)
        _RUNNING.add(self)
        threading.Thread(target=self._read_events, args=(read_fd,), daemon=True).start()
        logger.info("training %s in process %d (%s)", self.destination.name, self._process.pid, self.job_dir)

    def _read_events(self, fd: int) -> None:
        with open(fd, encoding="utf-8", errors="replace") as stream:
            for line in stream:
                try:
                    self._events.put(json.loads(line))
                except ValueError:
                    continue
        self._events.put(None)  # the child closed its end: it has ended

    def cancel(self) -> None:
        """End the run (SIGTERM to its process group, SIGKILL after `CANCEL_GRACE_S`); `updates` then cleans up."""
        self._cancel.set()
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass

    def _wait_for_exit(self) -> int:
        assert self._process is not None
        try:
            return self._process.wait(timeout=CANCEL_GRACE_S)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            return self._process.wait()

    # -------------------------------------------------------------- following it

    def updates(self, interval: float = 0.5, heartbeat: float = 2.0) -> Iterator[TrainingState]:
        """The run's state whenever it changes (looked at every `interval` seconds, shown at least every `heartbeat`
        seconds) until it ends, then once more, finished (its bundle published) or cancelled (its folder removed). A
        failed run raises `TrainingFailed` after removing its folder. Closed before the end (the page went away),
        the run goes on unattended."""
        state = self.state
        shown, last = None, 0.0
        try:
            while True:
                ended = self._drain(interval)
                self._scan_validation()
                if ended or self._cancel.is_set():
                    break
                now = (state.step, len(state.losses), len(state.validation), len(state.warnings))
                if now != shown or time.monotonic() - last >= heartbeat:
                    shown, last = now, time.monotonic()
                    yield state
            self._conclude()
            yield state
        except GeneratorExit:
            if self._process is not None and self._process.poll() is None and not self._cancel.is_set():
                self.attended = False
                logger.warning("training %s: its page went away; it goes on and its bundle will be in %s",
                               self.destination.name, self.destination.parent)
                threading.Thread(target=self._unattended, daemon=True).start()
                return
            try:
                self._conclude()
            except TrainingFailed as err:
                logger.error("training %s failed: %s", self.destination.name, err)
            raise

    def _unattended(self) -> None:
        try:
            while not self._drain(1.0) and not self._cancel.is_set():
                pass
            self._conclude()
        except TrainingFailed as err:
            logger.error("training %s (unattended) failed: %s", self.destination.name, err)

    def _conclude(self) -> None:
        """After the child has ended (or is being cancelled): publish the bundle or remove the run's folder; then
        `on_end`. Raises `TrainingFailed` for a run that failed."""
        if self.state.finished:
            return
        try:
            if self._cancel.is_set():
                self._wait_for_exit()
                self.state.cancelled = True
                self._discard("cancelled")
            else:
                self._process.wait()
                while not self._ended:  # the events the child wrote before it ended (its result among them)
                    self._drain(1.0)
                self._finish()
        finally:
            self.state.finished = True
            _RUNNING.discard(self)
            self._on_end()

    def _drain(self, timeout: float) -> bool:
        """Apply the child's events; True when it has ended."""
        if self._ended:
            return True
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return False
            if event is None:
                self._ended = True
                return True
            kind = event.get("event")
            if kind == "progress":
                self.state.step, self.state.total = int(event["step"]), int(event["total"])
                losses = self.state.losses
                if event.get("loss") is not None and (not losses or losses[-1][0] != self.state.step):
                    losses.append((self.state.step, float(event["loss"])))
            elif kind == "warning":
                self.state.warnings.append(str(event.get("message", "")))
            elif kind in ("done", "error"):
                self._result = event

    def _scan_validation(self) -> None:
        folder = self.job_dir / "validation"
        if folder.is_dir():
            found = sorted(p for p in folder.glob("step*.png"))
            if len(found) != len(self.state.validation):
                self.state.validation = found

    def _finish(self) -> None:
        result = self._result or {}
        if result.get("event") != "done":
            bug = bool(result.get("bug", True))
            if result.get("event") != "error":
                message = f"the training process ended without a result (exit code {self._process.returncode})"
            else:
                message = result.get("message") or result.get("error", "")
            if bug:
                logger.error("training %s failed:\n%s", self.destination.name, self._log_tail())
                message = (f"unexpected {result.get('error', 'end')}: {message} (a bug in lrkit; the server log has "
                           "the traceback)")
            self._discard("failed")
            raise TrainingFailed(message, user_error=not bug)
        bundle = Path(result["bundle"])
        if self.destination.exists():
            raise TrainingFailed(f"a concept named {self.destination.name!r} appeared in {self.destination.parent} "
                                 f"while this one trained; its bundle stays in {bundle}", user_error=True)
        os.replace(bundle, self.destination)
        shutil.rmtree(self.job_dir / "checkpoints", ignore_errors=True)
        self.state.bundle = self.destination
        logged = logged_losses(self.job_dir / "logs" / "metrics.csv")  # full precision, every log_every_n_steps
        if logged and len(logged) >= len(self.state.losses):
            self.state.losses = logged
        logger.info("trained %s", self.destination)

    def _discard(self, why: str) -> None:
        shutil.rmtree(self.job_dir, ignore_errors=True)
        logger.info("training %s %s; removed %s", self.destination.name, why, self.job_dir)

    def _log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join((self.job_dir / "worker.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def logged_losses(metrics: Path) -> list[tuple[int, float]]:
    """(step, loss) of every row of a run's logs/metrics.csv, steps counted from 1 as the step bar counts them."""
    import csv

    try:
        with open(metrics, newline="", encoding="utf-8") as file:
            rows = list(csv.DictReader(file))
    except OSError:
        return []
    out = []
    for row in rows:
        try:
            out.append((int(float(row["step"])) + 1, float(row["loss"])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


class JobBoard:
    """The running training jobs by the browser session that started them (what a Cancel button ends)."""

    def __init__(self):
        self._jobs: dict[str, TrainingJob] = {}
        self._lock = threading.Lock()

    def add(self, session: str, job: TrainingJob) -> None:
        with self._lock:
            self._jobs[session] = job

    def remove(self, session: str, job: TrainingJob) -> None:
        with self._lock:
            if self._jobs.get(session) is job:
                del self._jobs[session]

    def cancel(self, session: str) -> TrainingJob | None:
        """Cancel the session's running job, else a job whose page went away; returns it (None: there is none)."""
        with self._lock:
            job = self._jobs.get(session) or next((j for j in self._jobs.values() if not j.attended), None)
        if job is not None:
            job.cancel()
        return job


@atexit.register
def _end_children() -> None:
    """The app is exiting: end every training process it started."""
    for job in list(_RUNNING):
        job.cancel()


__all__ = ["DeviceSlot", "JobBoard", "TrainingFailed", "TrainingJob", "TrainingState", "logged_losses"]

"""`python -m lrkit.ui.worker REQUEST EVENTS_FD`: one training run of the web app, in a process of its own.

REQUEST is a JSON file `{"config": {...}}` (a training config as `train_concept` takes it). The run reports to the
app as JSON lines on the file descriptor EVENTS_FD:

    {"event": "progress", "step": 12, "total": 400, "loss": 0.0213}
    {"event": "warning", "message": "..."}
    {"event": "done", "bundle": "/.../jobs/<id>/concept"}
    {"event": "error", "message": "...", "bug": false}

Progress comes from a Lightning callback given to `train_concept` (the step and its loss, after each optimizer
step); warnings are the WARNING log records of any logger. Everything else the run prints goes to the process's real stdout and stderr (the app keeps them in the job's
worker.log). Cancelling is ending this process: the bundle is written atomically, so it is either complete or
absent.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import lrkit  # noqa: F401  (first: lrkit.runtime's CPU thread settings apply before torch loads)


class Events:
    """JSON lines on a file descriptor."""

    def __init__(self, fd: int):
        self.stream = open(fd, "w", buffering=1, encoding="utf-8", closefd=True)

    def emit(self, **event) -> None:
        self.stream.write(json.dumps(event) + "\n")


def progress_callback(events: Events):
    """A Lightning callback reporting each optimizer step and its loss (rank 0)."""
    import lightning as L

    class ProgressEvents(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if not trainer.is_global_zero:
                return
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            value = float(loss.detach()) if loss is not None else None  # one host sync per step: the page shows it
            events.emit(event="progress", step=trainer.global_step, total=trainer.max_steps, loss=value)

    return ProgressEvents()


class WarningEvents(logging.Handler):
    """WARNING records of any logger as warning events."""

    def __init__(self, events: Events):
        super().__init__(logging.WARNING)
        self.events = events

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.events.emit(event="warning", message=record.getMessage())
        except Exception:  # a broken pipe to the app must not end the run
            pass


def main(argv: list[str]) -> int:
    from lrkit.logs import configure_console
    from lrkit.errors import is_user_error

    request, fd = Path(argv[0]), int(argv[1])
    events = Events(fd)
    configure_console(0)
    logging.getLogger().addHandler(WarningEvents(events))
    try:
        from lrkit.training import train_concept

        config = json.loads(request.read_text(encoding="utf-8"))["config"]
        bundle = train_concept(config, callbacks=[progress_callback(events)])
    except Exception as err:
        traceback.print_exc()
        events.emit(event="error", message=str(err) or type(err).__name__, error=type(err).__name__,
                    bug=not is_user_error(err))
        return 2 if is_user_error(err) else 1
    events.emit(event="done", bundle=str(bundle))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

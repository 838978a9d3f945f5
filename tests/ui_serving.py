"""What the web-app tests share: the app served in-process on a free port, Gradio's upload cache under its root."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(root: Path, **launch_kwargs):
    """`lrkit.ui.app.launch` on ROOT at a free port, Gradio's temporary files in ROOT/tmp/gradio; yields
    (demo, url), then closes the app and restores GRADIO_TEMP_DIR."""
    from lrkit.ui.app import launch

    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(Path(root) / "tmp" / "gradio")
    demo, url = launch(root=root, port=free_port(), prevent_thread_lock=True, **launch_kwargs)
    try:
        yield demo, url
    finally:
        demo.close()
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous

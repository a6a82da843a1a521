"""The multiprocess metrics folder, kept apart from ``service.metrics`` because it must be set
up before prometheus-client is first imported (the client picks its mode at import)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def use_fresh_dir() -> Path:
    """Create an empty folder for every process's samples and point this process and its children at it."""
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:  # emptied, not replaced: it may be a mount point (a Kubernetes emptyDir)
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        for entry in path.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix="digitserve-metrics-"))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return path

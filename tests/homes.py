"""LORAFLOW_HOME of a test module's own: its first run is cold whatever ran before."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def loraflow_home(path: Path):
    """LORAFLOW_HOME set to `path` for the duration, then restored."""
    old = os.environ["LORAFLOW_HOME"]
    os.environ["LORAFLOW_HOME"] = str(path)
    try:
        yield path
    finally:
        os.environ["LORAFLOW_HOME"] = old

"""`python -m app`: prepare the metrics directory, then exec gunicorn (so it receives SIGTERM directly)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from app.settings import Settings

APP_FACTORY = "app.main:create_app()"


def prepare_multiproc_dir() -> str:
    """prometheus_client multiprocess mode needs an empty directory per instance, set before import.

    An explicit PROMETHEUS_MULTIPROC_DIR (the image sets one on an emptyDir) is wiped, because an
    emptyDir survives container restarts and stale files would count dead processes.
    """
    default = Path(tempfile.gettempdir()) / f"gateway-metrics-{os.getpid()}"
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or str(default)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def main() -> None:
    Settings()  # fail fast, with pydantic's message, before gunicorn forks anything
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = prepare_multiproc_dir()
    conf = str(Path(__file__).with_name("gunicorn_conf.py"))
    args = [sys.executable, "-m", "gunicorn", "--config", conf, APP_FACTORY]
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()

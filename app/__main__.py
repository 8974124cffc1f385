"""`python -m app`: prepare the metrics directory, then exec gunicorn (so it receives SIGTERM directly)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from app.private_dir import UnsafeDirectoryError, fresh_private
from app.settings import Settings

APP_FACTORY = "app.main:create_app()"


def prepare_multiproc_dir() -> str:
    """prometheus_client multiprocess mode needs an empty directory per instance, set before import.

    An explicit PROMETHEUS_MULTIPROC_DIR (the image sets one on an emptyDir) is checked and emptied,
    because an emptyDir survives container restarts and stale files would count dead processes.
    """
    return fresh_private(os.environ.get("PROMETHEUS_MULTIPROC_DIR"), prefix="gateway-metrics-")


def prepare_resume_dir(settings: Settings) -> str:
    """The local resume store's directory: one per instance, shared by its workers, empty at start."""
    return fresh_private(settings.resume_dir, prefix="gateway-resume-")


def main() -> None:
    settings = Settings()  # fail fast, with pydantic's message, before gunicorn forks anything
    try:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = prepare_multiproc_dir()
        if settings.resume_enabled and settings.resume_store == "local":
            os.environ["RESUME_DIR"] = prepare_resume_dir(settings)
    except UnsafeDirectoryError as exc:
        sys.exit(f"refusing to start: {exc}")
    conf = str(Path(__file__).with_name("gunicorn_conf.py"))
    args = [sys.executable, "-m", "gunicorn", "--config", conf, APP_FACTORY]
    os.execv(sys.executable, args)


if __name__ == "__main__":
    main()

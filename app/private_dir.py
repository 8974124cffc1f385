"""Directories the gateway writes state into (resume logs, multiprocess metrics), made safe to use.

A default directory is a fresh `tempfile.mkdtemp` (random name, mode 0700): nobody can plant a
file or symlink at a name they guessed. A directory given in the settings is used only if it is a
real directory (not a symlink) owned by the user the gateway runs as; anything else stops start-up
with a message that names the path. Group and world write bits on it are removed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile


class UnsafeDirectoryError(RuntimeError):
    """A configured state directory the gateway must not use."""


def ensure_private(path: str) -> str:
    """`path` as a directory only this user controls: created (0700) if missing, else checked."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectoryError(f"{path} must be a directory, not a symlink or a file")
    if info.st_uid != os.geteuid():
        raise UnsafeDirectoryError(
            f"{path} is owned by uid {info.st_uid}, not by uid {os.geteuid()} that runs the gateway"
        )
    if info.st_mode & 0o022:
        os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o022)
    return path


def fresh_private(path: str | None, *, prefix: str) -> str:
    """An empty private directory: `path` (checked, then emptied) or a new mkdtemp one."""
    if not path:
        return tempfile.mkdtemp(prefix=prefix)
    ensure_private(path)
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    return path

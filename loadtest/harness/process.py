"""Process supervision: each child leads its own process group, logs to its own file, and is always reaped.

A child is stopped with a signal (SIGTERM by default), given a while to exit, then its whole group gets
SIGKILL. The leader is never reaped before its group was signalled for the last time: until then its pid,
and so the group id, cannot belong to anyone else, and signals reach only what was started here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from loadtest.harness.errors import HarnessError
from loadtest.harness.wait import wait_until

STOP_TIMEOUT_S = 10.0  # how long a stopped child may take to exit before its group gets SIGKILL
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # Debian puts some daemons (nginx) in sbin, often not on PATH
DEBIAN_PACKAGES = {"promtool": "prometheus"}  # binaries whose Debian package is named otherwise
SD_LISTEN_FDS_START = 3  # systemd's first passed descriptor


def require_binary(name: str) -> str:
    """The path of a binary CI installs (.ci/bootstrap.sh); raises HarnessError when it is missing."""
    path = shutil.which(name) or shutil.which(name, path=SYSTEM_PATH)
    if path is None:
        raise HarnessError(
            f"`{name}` is not installed: apt-get install {DEBIAN_PACKAGES.get(name, name)} "
            "(.ci/bootstrap.sh installs it)"
        )
    return path


def tail(path: Path, lines: int = 30) -> str:
    """The end of a log file ("" if there is none), for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def socket_activation(argv: Sequence[str], sockets: Sequence[socket.socket]) -> tuple[list[str], dict[str, str]]:
    """systemd socket activation: `argv` run with `sockets` on fds 3, 4, ... and LISTEN_FDS / LISTEN_PID set
    (gunicorn takes them instead of binding, so a port is never picked, released and re-bound). Returns the
    argv to start (a shell that places the fds and execs `argv`, keeping its pid) and the env to add; start it
    with `pass_fds=[s.fileno() for s in sockets]`."""
    fds = [sock.fileno() for sock in sockets]
    targets = [SD_LISTEN_FDS_START + i for i in range(len(fds))]
    # every socket is first copied to a spare fd, so that no move overwrites a socket not yet moved
    spares = [n for n in range(targets[-1] + 1, targets[-1] + 1 + 2 * len(fds) + 2) if n not in fds][: len(fds)]
    copy = " ".join(f"{spare}<&{fd}" for spare, fd in zip(spares, fds, strict=True))
    place = " ".join(f"{target}<&{spare}" for target, spare in zip(targets, spares, strict=True))
    close = " ".join(f"{spare}<&-" for spare in spares)
    script = f"exec {copy}; exec {place} {close}; LISTEN_PID=$$; export LISTEN_PID; exec {shlex.join(argv)}"
    # bash: dash (Debian's /bin/sh) reads only single-digit fds in redirections, and a process with many files
    # open (a test run) gets its sockets on higher ones
    return ["/bin/bash", "-c", script], {"LISTEN_FDS": str(len(fds))}


class Child:
    """A process started here, leader of its own process group (the group is what gets stopped)."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        pass_fds: Sequence[int] = (),
        append_log: bool = True,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.log_path = log_path
        self.stop_signal = stop_signal  # what stop_all() sends (a gateway that should not drain: SIGKILL)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab" if append_log else "wb") as out:
            self.popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                pass_fds=tuple(pass_fds),
                process_group=0,
            )
        self.pid = self.popen.pid
        try:
            self.create_time = psutil.Process(self.pid).create_time()
        except psutil.Error:  # already gone (exec failed): nothing of it left to stop
            self.create_time = 0.0
        self.exit_code: int | None = None

    def exited(self) -> bool:
        """Has the leader exited? (It stays a zombie, unreaped, so its pid and group id stay ours.)"""
        if self.exit_code is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def send(self, sig: int) -> None:
        if self.exit_code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.exited():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_ready(
        self, ready: Callable[[], object], timeout: float, what: str | None = None, *, interval: float = 0.05
    ) -> float:
        """Wait until `ready()` holds; fails at once if the child exits, with the end of its log."""
        try:
            return wait_until(ready, timeout, what or self.name, alive=lambda: not self.exited(), interval=interval)
        except HarnessError as exc:
            raise HarnessError(f"{exc}\n{tail(self.log_path)}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """`sig` to the leader, up to `timeout` for it to exit, then SIGKILL to whatever is left of the group."""
        if self.exit_code is None:
            if not self.exited():
                self.send(sig)
                self.wait_exit(timeout)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)  # the leader is alive or a zombie: the group is ours
            self.exit_code = self.popen.wait()
        return self.exit_code

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid, "pgid": self.pid, "create_time": self.create_time}


class Supervisor:
    """Every child of a run, stopped in reverse order; `record_path` (if given) lists the ones still running,
    for `kill_recorded()` after a run that could not clean up."""

    def __init__(self, record_path: Path | None = None) -> None:
        self.record_path = record_path
        self.children: list[Child] = []

    def spawn(self, name: str, argv: Sequence[str], **kwargs: Any) -> Child:
        child = Child(name, argv, **kwargs)
        self.children.append(child)
        self._write()
        return child

    def reaped(self, child: Child) -> None:
        self._write()

    def _write(self) -> None:
        if self.record_path is None:
            return
        live = [c.record() for c in self.children if c.exit_code is None]
        tmp = self.record_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(live, indent=1))
        tmp.replace(self.record_path)

    def stop_all(self) -> None:
        """Each child still running gets its `stop_signal`, newest first, then SIGKILL to its group if need be."""
        for child in reversed(self.children):
            if child.exit_code is None:
                child.stop(child.stop_signal)
        self._write()


def kill_recorded(path: Path) -> list[str]:
    """Backstop after a run that could not clean up (it was SIGKILLed): SIGKILL the process groups it recorded.

    A group is killed only while provably the run's: its leader alive with the recorded start time (killpg),
    or, once the leader is gone, the members still in the group that are not leaders of it themselves (a group
    id stays taken while a member lives; a new process reusing the number would lead its own group).
    """
    if not path.exists():
        return []
    killed = []
    for entry in json.loads(path.read_text() or "[]"):
        pid, pgid = int(entry["pid"]), int(entry["pgid"])
        try:
            leader = psutil.Process(pid)
            if abs(leader.create_time() - float(entry["create_time"])) < 0.01 and os.getpgid(pid) == pgid:
                os.killpg(pgid, signal.SIGKILL)
                killed.append(entry["name"])
                continue
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if proc.pid != pgid and os.getpgid(proc.pid) == pgid:
                    proc.kill()
                    killed.append(f"{entry['name']}:{proc.pid}")
    return killed

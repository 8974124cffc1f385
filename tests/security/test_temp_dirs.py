"""Temp directories: unpredictable names, no symlinks followed, a configured directory's owner checked.

The gateway is started for real (`python -m app`); the stream files are checked on the local resume
backend itself, with a symlink planted where a stream's file would go.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest

from app.resume.local import DirectoryBackend
from app.resume.store import ResumeStore, StreamMeta
from app.streaming.encoders import SeedEncoder
from tests.conftest import GatewayFactory

NOBODY = 65534


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_default_directories_are_fresh_private_mkdtemps(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway()
    env = _environ(gateway.pid)  # the gunicorn master: `python -m app` exec'd into it, same pid
    for variable, prefix in (("RESUME_DIR", "gateway-resume-"), ("PROMETHEUS_MULTIPROC_DIR", "gateway-metrics-")):
        path = Path(env[variable])
        assert path.name.startswith(prefix)
        assert path.name != f"{prefix}{gateway.pid}"  # not a name anyone could plant in advance
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode) and not stat.S_ISLNK(info.st_mode)
        assert info.st_uid == os.geteuid()
        assert stat.S_IMODE(info.st_mode) == 0o700


@pytest.mark.parametrize("variable", ["RESUME_DIR", "PROMETHEUS_MULTIPROC_DIR"])
def test_a_configured_directory_that_is_a_symlink_is_refused(
    start_gateway: GatewayFactory, tmp_path: Path, variable: str
) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep me")
    link = tmp_path / "state"
    link.symlink_to(target)
    with pytest.raises(RuntimeError, match=r"refusing to start: .*must be a directory, not a symlink"):
        start_gateway(**{variable: str(link)})
    assert (target / "precious").read_text() == "keep me"
    assert sorted(p.name for p in target.iterdir()) == ["precious"]


@pytest.mark.parametrize("variable", ["RESUME_DIR", "PROMETHEUS_MULTIPROC_DIR"])
def test_a_configured_directory_of_another_user_is_refused(
    start_gateway: GatewayFactory, tmp_path: Path, variable: str
) -> None:
    theirs, owner = tmp_path / "theirs", NOBODY
    theirs.mkdir(mode=0o700)
    (theirs / "their-file").write_text("not yours")
    if os.geteuid() == 0:
        os.chown(theirs, NOBODY, NOBODY)
    else:  # without root no directory can be given away: /proc is root's, and nothing in it can be removed
        theirs, owner = Path("/proc"), 0
    with pytest.raises(RuntimeError, match=f"refusing to start: .*owned by uid {owner}"):
        start_gateway(**{variable: str(theirs)})
    if owner == NOBODY:
        assert (theirs / "their-file").read_text() == "not yours"


def test_stream_files_are_created_exclusively_and_never_through_a_symlink(tmp_path: Path) -> None:
    store_dir = tmp_path / "resume"
    victim = tmp_path / "victim"
    victim.write_bytes(b"original\n")
    store = ResumeStore(DirectoryBackend(str(store_dir), ttl_s=60), flush_interval_s=0.01, max_events=100)
    planted, existing, fresh = "a" * 32, "b" * 32, "c" * 32
    (store_dir / f"{planted}.sse").symlink_to(victim)  # planted where a stream's file will be created
    (store_dir / f"{existing}.sse").write_bytes(b"left over\n")  # a file that is already there

    async def scenario() -> list[bool]:
        logs = []
        for sid in (fresh, planted, existing):  # one flush each: a failed write fails its whole flush
            log = store.open(StreamMeta(sid, "m", [], 10))
            log.append(SeedEncoder(sid).opening(), 1)
            await store.flush()
            logs.append(log)
        await store.stop()
        return [log.stored for log in logs]

    assert asyncio.run(scenario()) == [True, False, False]  # the two lost resumption instead
    assert victim.read_bytes() == b"original\n"
    assert (store_dir / f"{existing}.sse").read_bytes() == b"left over\n"
    assert stat.S_IMODE(os.lstat(store_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(store_dir / f"{fresh}.sse").st_mode) == 0o600

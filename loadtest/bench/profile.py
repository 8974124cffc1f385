"""py-spy under a load (every worker of a server) and what dominates its samples (`--profile`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from loadtest.bench.measure import run_load
from loadtest.bench.plan import ROOT, log
from loadtest.bench.servers import Server

PROFILE_RATE_HZ = 100
BOOTSTRAP_FRAMES = re.compile(
    r"\((?:gunicorn/|uvicorn_worker/|<frozen runpy>|uvicorn/_compat\.py|asyncio/runners\.py|"
    r"asyncio/events\.py|asyncio/base_events\.py)"
)
SITE_PACKAGES = re.compile(r"(?<=\()\S*?(?:site-packages|lib/python3\.\d+)/|(?<=\()" + re.escape(f"{ROOT}/"))


def py_spy_binary() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def profile_load(server: Server, argv: list[str], seconds: float, label: str) -> dict[str, Any]:
    """Run one load while py-spy samples every worker of `server` (not counted in any measurement)."""
    binary = py_spy_binary()
    if binary is None:
        return {"label": label, "error": "py-spy not found (pip install py-spy)"}
    out = server.log_dir / f"profile-{server.name}-{label.replace(' ', '_')}.raw"
    log(f"{server.name}: profiling {label} with py-spy ({PROFILE_RATE_HZ} Hz, {seconds:.0f} s)")
    spy = subprocess.Popen(
        [
            binary,
            "record",
            "-p",
            str(server.master.pid),
            "--subprocesses",
            "--nonblocking",
            "-r",
            str(PROFILE_RATE_HZ),
            "-d",
            str(round(seconds)),
            "-f",
            "raw",
            "-o",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        result = run_load(argv)
        _, err = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not out.exists():
        return {"label": label, "error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    return {
        "label": label,
        "file": out,
        "seconds": seconds,
        "ttft_ms": result["ttft_ms"],
        "errors": result["errors"],
        **summarize_profile(out),
    }


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of the sampled (non-idle) stacks, per frame "function (file:line)"."""
    self_n: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [SITE_PACKAGES.sub("", f) for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += n
        self_n[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    # The loop and gunicorn's bootstrap are on every stack (py-spy --nonblocking truncates some): no information.
    inclusive = [(f, n) for f, n in incl.most_common() if not BOOTSTRAP_FRAMES.search(f)][:top]
    return {
        "samples": total,
        "self": [(f, n / total) for f, n in self_n.most_common(top)],
        "inclusive": [(f, n / total) for f, n in inclusive],
    }

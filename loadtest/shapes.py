"""Load shapes as plain stage tables: `LOCUST_SHAPE` picks one, its parameters come from env vars.

Pure Python (no Locust import), so tests check the plans directly; `locustfile.py` wraps the chosen plan
in a `LoadTestShape`. A plan is a list of stages, each holding a user count until its end time (seconds
since the shape started), reached at its spawn rate (users started or stopped per second); after the
last stage the test stops.

    ramp   0 → LOCUST_RAMP_USERS (100) linearly over LOCUST_RAMP_SECONDS (60), hold LOCUST_RAMP_HOLD_SECONDS (60)
    spike  LOCUST_SPIKE_BASE_USERS (10); at LOCUST_SPIKE_AT_SECONDS (60) jump to LOCUST_SPIKE_USERS (100) at
           LOCUST_SPIKE_SPAWN_RATE (100/s) for LOCUST_SPIKE_SECONDS (30); back to base until
           LOCUST_SPIKE_TOTAL_SECONDS (180)
    soak   LOCUST_SOAK_USERS (50), ramped over LOCUST_SOAK_RAMP_SECONDS (60), held LOCUST_SOAK_SECONDS (3600)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple


class Stage(NamedTuple):
    end: float  # seconds since the shape started
    users: int
    spawn_rate: float


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ValueError(f"{name}={value:g} must be at least {minimum:g}")
    return value


def _users(env: Mapping[str, str], name: str, default: int) -> int:
    return int(_number(env, name, default, minimum=1))


def ramp(env: Mapping[str, str]) -> list[Stage]:
    users = _users(env, "LOCUST_RAMP_USERS", 100)
    seconds = _number(env, "LOCUST_RAMP_SECONDS", 60, minimum=0.1)
    hold = _number(env, "LOCUST_RAMP_HOLD_SECONDS", 60)
    return [Stage(seconds + hold, users, users / seconds)]


def spike(env: Mapping[str, str]) -> list[Stage]:
    base = _users(env, "LOCUST_SPIKE_BASE_USERS", 10)
    peak = _users(env, "LOCUST_SPIKE_USERS", 100)
    at = _number(env, "LOCUST_SPIKE_AT_SECONDS", 60, minimum=0.1)
    length = _number(env, "LOCUST_SPIKE_SECONDS", 30, minimum=0.1)
    rate = _number(env, "LOCUST_SPIKE_SPAWN_RATE", 100, minimum=0.1)
    total = _number(env, "LOCUST_SPIKE_TOTAL_SECONDS", 180)
    if total < at + length:
        raise ValueError("LOCUST_SPIKE_TOTAL_SECONDS must be at least LOCUST_SPIKE_AT_SECONDS + LOCUST_SPIKE_SECONDS")
    stages = [Stage(at, base, rate), Stage(at + length, peak, rate)]
    if total > at + length:
        stages.append(Stage(total, base, rate))
    return stages


def soak(env: Mapping[str, str]) -> list[Stage]:
    users = _users(env, "LOCUST_SOAK_USERS", 50)
    ramp_seconds = _number(env, "LOCUST_SOAK_RAMP_SECONDS", 60, minimum=0.1)
    hold = _number(env, "LOCUST_SOAK_SECONDS", 3600)
    return [Stage(ramp_seconds + hold, users, users / ramp_seconds)]


PLANS: dict[str, Callable[[Mapping[str, str]], list[Stage]]] = {"ramp": ramp, "spike": spike, "soak": soak}


def plan_from_env(env: Mapping[str, str]) -> tuple[str, list[Stage]] | None:
    """The shape `LOCUST_SHAPE` names and its stages; None when unset (users and rate come from -u/-r)."""
    name = env.get("LOCUST_SHAPE", "").strip().lower()
    if not name or name == "none":
        return None
    if name not in PLANS:
        raise ValueError(f"LOCUST_SHAPE={name!r}: expected one of {', '.join(PLANS)} (or unset)")
    return name, PLANS[name](env)


def tick(stages: list[Stage], elapsed: float) -> tuple[int, float] | None:
    """What `LoadTestShape.tick` returns `elapsed` seconds in: (users, spawn rate), or None to stop."""
    for stage in stages:
        if elapsed < stage.end:
            return stage.users, stage.spawn_rate
    return None

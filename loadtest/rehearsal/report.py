"""The rehearsal's picture (rollout.png: active connections per instance and TTFT p95, SIGTERM markers) and
its Markdown report."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from loadtest.rehearsal.run import CLAIM_MESSAGE


def render_png(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = float(results["t0_epoch"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, height_ratios=[3, 2])
    colours = {}
    series = sorted(results["prometheus"]["active_connections"], key=lambda s: s["labels"].get("instance", ""))
    for n, item in enumerate(series):
        name = item["labels"].get("instance", "?")
        xs, ys = with_gaps([(t - t0, v) for t, v in item["values"]])
        width = 1.2 + 1.0 * (len(series) - 1 - n)  # wider first: instances carrying equal loads stay visible
        (line,) = top.step(xs, ys, where="post", label=name, linewidth=width, alpha=0.85)
        colours[name] = line.get_color()
    for termination in results["terminations"]:
        colour = colours.get(termination["instance"], "grey")
        for axis in (top, bottom):
            axis.axvspan(termination["removed_at"], termination["added_at"], color=colour, alpha=0.08)
            axis.axvline(termination["sigterm_at"], color=colour, linestyle="--", linewidth=1.2)
        top.annotate(
            f"SIGTERM {termination['instance']}\ndrain {termination['drain_s']:.1f} s",
            xy=(termination["sigterm_at"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3),
            textcoords="offset points",
            va="top",
            fontsize=8,
            color=colour,
        )
    for n, roll in enumerate(results.get("model_rolls") or ()):  # models mode: the model servers' kills
        for axis in (top, bottom):
            axis.axvline(roll["killed_at"], color="crimson", linestyle=":", linewidth=1.2)
        top.annotate(
            f"SIGKILL {roll['server']}\n{roll['in_flight_at_kill']} in flight",
            xy=(roll["killed_at"], 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -3 - 24 * (n % 3)),  # kills seconds apart: staggered labels
            textcoords="offset points",
            va="top",
            fontsize=8,
            color="crimson",
        )
    top.set_ylabel("active streams per instance")
    top.set_ylim(bottom=0)
    top.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, borderaxespad=0)
    top.grid(alpha=0.3)
    config = results["config"]
    counts = results["summary"]
    models = results.get("models")
    top.set_title(
        f"Model servers rolled: {config['models']} model servers, {config['instances']} gateway instance(s), "
        f"{config['users']} users  —  completed {counts['completed']}, truncated {counts['truncated']}, "
        f"errors {counts['errors']}, continued {models['continued']}"
        if models is not None
        else f"Rolling restart, mode {results['mode']}: {config['instances']} instances, {config['users']} users, "
        f"drain {config['drain_timeout']:g} s, preStop {config['prestop']:g} s  —  completed {counts['completed']}, "
        f"server_shutdown {counts['graceful']}, truncated {counts['truncated']}, errors {counts['errors']}",
        fontsize=9,
    )
    highest = 0.0
    ttft_lines: list[Any] = []
    for item in results["prometheus"]["ttft_p95"]:
        pairs = [(t - t0, v * 1000) for t, v in item["values"] if v == v]  # NaN: no stream started in the window
        if pairs:
            xs, ys = with_gaps(pairs)
            ttft_lines += bottom.plot(
                xs, ys, color="black", linewidth=1.4, label="TTFT p95,\nall instances\n(rate over 10 s)"
            )
            highest = max(highest, max(p[1] for p in pairs))
    bottom.set_ylabel("TTFT p95 (ms)")
    markers = (
        "dotted: a model server's SIGKILL"
        if models is not None
        else "shaded: instance out of nginx's upstream; dashed: SIGTERM"
    )
    bottom.set_xlabel(
        f"seconds since the load started ({markers}; a line breaks while its instance is not scraped)", fontsize=8
    )
    bottom.set_ylim(0, max(highest * 1.3, 10.0))
    bottom.grid(alpha=0.3)
    if ttft_lines:
        bottom.legend(
            handles=ttft_lines[:1], loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, borderaxespad=0
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def with_gaps(points: list[tuple[float, float]], step: float = 1.0) -> tuple[list[float], list[float]]:
    """x and y lists with a NaN where samples are missing (an instance down), so the line breaks there."""
    xs: list[float] = []
    ys: list[float] = []
    for x, y in points:
        if xs and x - xs[-1] > 1.5 * step:
            xs.append(xs[-1] + step)
            ys.append(float("nan"))
        xs.append(x)
        ys.append(y)
    return xs, ys


def _num(text: str) -> str:
    try:
        return f"{float(text):.0f}"
    except ValueError:
        return text or "n/a"


def _ms(values: list[float]) -> str:
    return f"{max(values) * 1000:.0f} ms" if values else "n/a"


def terminations_section(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Per instance",
        "",
        "| instance | out of upstream at | SIGTERM at | streams at SIGTERM | drain (SIGTERM → exit) | cut by the drain "
        "| exit code | replacement ready after | back in upstream at |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in results["terminations"]:
        lines.append(
            f"| {t['instance']} | {t['removed_at']:.1f} s | {t['sigterm_at']:.1f} s | {t['in_flight_at_sigterm']} | "
            f"**{t['drain_s']:.2f} s** | {t['cut_by_drain']} | {t['exit_code']} | {t['replacement_ready_s']:.1f} s | "
            f"{t['added_at']:.1f} s |"
        )
    return [
        *lines,
        "",
        'Times are seconds since the load started; "cut by the drain" sums the workers\' '
        "`drain finished` log lines (streams still running at the drain deadline).",
        "",
    ]


def models_section(results: dict[str, Any]) -> list[str]:
    """Models mode: each model server's roll, and what became of the streams it held."""
    counts, models = results["summary"], results["models"]
    lines = [
        "## Model servers",
        "",
        f"Streams: **started {counts['started']}, completed {counts['completed']}, failed {counts['errors']}, "
        f"truncated {counts['truncated']}, continued {models['continued']}** (continued: streams whose model "
        "server died mid-stream, continued on another one with the text so far as a partial answer; "
        f"`streaming_upstream_continuations_total` of the gateways, which also counts "
        f"{models['continuation_failed']} that could not be continued); {models['killed_in_flight']} streams were "
        "in flight on the model servers when they were killed (their /_stats).",
        "",
        "| model server | replaced by | replacement ready at | terminating at | SIGKILL at | streams in flight at "
        "the kill | requests it served | slice deleted at |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["model_rolls"]:
        lines.append(
            f"| {r['server']} | {r['replacement']} | {r['added_at']:.1f} s | {r['terminating_at']:.1f} s "
            f"| {r['killed_at']:.1f} s | **{r['in_flight_at_kill']}** | {r['requests_served']} "
            f"| {r['deleted_at']:.1f} s |"
        )
    return [*lines, "", "Times are seconds since the load started.", ""]


def render_report(results: dict[str, Any], png_name: str, command: str) -> str:
    config, counts = results["config"], results["summary"]
    verdict = "PASS" if results["ok"] else "FAIL"
    setup = (
        f"{config['instances']} gateway instance(s) (`python -m app`, {config['workers']} workers each, "
        "UPSTREAM_DISCOVERY=kubernetes, UPSTREAM_CONTINUATION=vllm) in front of "
        f"{config['models']} fake model servers (loadtest/fake_openai.py at {config['tokens_per_second']:g} tok/s, "
        f"max_tokens {config['max_tokens']}: ~{config['stream_seconds']:g} s streams), each the endpoint of an "
        "EndpointSlice on the rehearsal's own API server (loadtest/harness/fake_apiserver.py), behind Debian's "
        "nginx, Prometheus scraping each gateway every second, Locust with "
        f"{config['users']} users (/stream, /v1/chat/completions, /ws; /stream and /ws texts checked against the "
        f"fake's) for {results['load_seconds']:g} s. Each model server in turn: replacement started on a new port "
        f"and added ready, {config['min_ready']:g} s later (minReadySeconds) the old one marked terminating, "
        f"SIGKILLed {config['kill_grace']:g} s later (it does not "
        "drain: its streams die mid-stream and must continue on another server), its slice deleted."
        if results["mode"] == "models"
        else f"{config['instances']} gateway instances (`python -m app`, {config['workers']} workers each, built-in "
        f"mock at {config['tokens_per_second']:g} tok/s, max_tokens {config['max_tokens']}: "
        f"~{config['stream_seconds']:g} s streams) behind Debian's nginx (the chart's Ingress settings), Prometheus "
        f"scraping each instance every second, Locust with {config['users']} users (/stream, /v1/chat/completions, "
        f"/ws) for {results['load_seconds']:g} s. Each instance in turn: out of the upstream (reload), preStop "
        f"{config['prestop']:g} s, SIGTERM, drain (DRAIN_TIMEOUT_SECONDS={config['drain_timeout']:g}), exit, "
        "replacement on the same port, /ready, back in the upstream (reload)."
        + (" RESUME_STORE=redis on a real redis-server." if results["mode"] == "resume" else "")
    )
    lines = [
        f"# Rolling-restart rehearsal: mode `{results['mode']}` — {verdict}",
        "",
        f"{results['machine']['date']}, {results['machine']['cpus']} CPUs, {results['machine']['platform']}, "
        f"Python {results['machine']['python']}. Command: `{command}`",
        "",
        setup,
        "",
        "## Streams (Locust)",
        "",
        "| started | completed | graceful (server_shutdown) | truncated | refused | errors | aborted by the load "
        "test's stop | reconnects | resent unanswered |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {counts['started']} | {counts['completed']} | {counts['graceful']} | {counts['truncated']} | "
        f"{counts['refused']} | {counts['errors']} | {counts['aborted']} | {counts['reconnects']} | "
        f"{counts['retried']} |",
        "",
    ]
    if results["by_endpoint"]:
        lines += [
            "| endpoint | started | completed | graceful | truncated | refused | errors | aborted |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for endpoint, c in results["by_endpoint"].items():
            lines.append(
                f"| `{endpoint}` | {c.get('started', 0)} | {c.get('completed', 0)} | {c.get('graceful', 0)} "
                f"| {c.get('truncated', 0)} | {c.get('refused', 0)} | {c.get('errors', 0)} | "
                f"{c.get('aborted', 0)} |"
            )
        lines.append("")
    if results["by_reason"]:
        lines.append(
            "Ends other than `completed`: "
            + ", ".join(f"`{reason}` {n}" for reason, n in results["by_reason"].items())
            + "."
        )
        lines.append("")
    if results["locust_resume"] is not None:
        lines += [
            "Locust's resuming users: "
            + ", ".join(f"{key} {n}" for key, n in results["locust_resume"].items())
            + " (`resume_mismatch` and `not_resumable` are counted in `errors` too).",
            "",
        ]
    nginx = results["nginx_requests"]
    lines += [
        f"nginx: {nginx['requests']} requests ("
        + ", ".join(f"{status}: {n}" for status, n in nginx["by_status"].items())
        + f"); {nginx['retried_on_another_instance']} sent to a second instance by `proxy_next_upstream`"
        + (
            " (" + ", ".join(f"upstream statuses {k}: {v}" for k, v in nginx["retries"].items()) + ")"
            if nginx["retries"]
            else ""
        )
        + ".",
        "",
    ]
    if results.get("models") is not None:
        lines += models_section(results)
    else:
        lines += terminations_section(results)
    if results["resume_clients"] is not None:
        r = results["resume_clients"]
        lines += [
            "## Resumption (the rehearsal's own resuming SSE clients)",
            "",
            "| streams | completed with the whole text | server_shutdown seen | with a resume id | resumed | failures "
            "| refused |",
            "|---:|---:|---:|---:|---:|---|---:|",
            f"| {r['streams']} | {r['completed']} | {r['shutdowns']} | {r['shutdowns_with_resume']} | {r['resumed']} | "
            f"{', '.join(f'{k} {v}' for k, v in r['failures'].items()) or 'none'} | {r['refused']} |",
            "",
            "Each resumed stream is checked to `done`: status and token ids 0..n once each and in order, the text "
            "equal to the mock's uninterrupted answer, `done.tokens` = max_tokens."
            + (
                f" Note: {r['done_id_skips']} of the completed streams got a `done` whose id is not n+1 (a skipped "
                "id: the live `done` is encoded once for the resume log and again for the client)."
                if r["done_id_skips"]
                else ""
            ),
            "",
            f"Gateway side (their logs): {results['handover']['cut_by_drains']} streams were still running at a "
            f"drain deadline; the {results['handover']['cut_resumable']} of them on /stream and /ws were handed to "
            f"the fleet (the /v1/chat/completions ones end with server_shutdown), and claimers on other instances "
            f"continued {results['handover']['continued_elsewhere']} (`{CLAIM_MESSAGE}`).",
            "",
        ]
        if results["locust_resume"] is None:
            lines += [
                "This locustfile's users do not resume (their summary has no `resumed` count): after "
                "`server_shutdown` they count a graceful end and open a new stream.",
                "",
            ]
    ttft = [v for item in results["prometheus"]["ttft_p95"] for _, v in item["values"] if v == v]
    lines += [
        "## Over the rollout",
        "",
        f"![active connections per instance and TTFT p95]({png_name})",
        "",
        f"TTFT p95 from Prometheus (`{results['prometheus']['queries']['ttft_p95']}`): highest {_ms(ttft)}, "
        f"median {(statistics.median(ttft) * 1000 if ttft else 0):.0f} ms (interpolated inside the histogram's "
        "buckets, 50 ms, 100 ms, 250 ms, ...: any p95 between 50 and 100 ms reads as ~97 ms; no line where no "
        "stream started in the last 10 s). Active connections: "
        f"`{results['prometheus']['queries']['active_connections']}`. Locust's own measurements:",
        "",
    ]
    ttft_rows = [row for row in results["locust_stats"] if row["Name"] in ("TTFT", "stream duration")]
    if ttft_rows:
        lines += ["| Locust | count | median | p95 | p99 | max |", "|---|---:|---:|---:|---:|---:|"]
        for row in ttft_rows:
            cells = [_num(row[key]) for key in ("Median Response Time", "95%", "99%", "Max Response Time")]
            lines.append(
                f"| {row['Type']} {row['Name']} | {row['Request Count']} | "
                + " | ".join(f"{cell} ms" for cell in cells)
                + " |"
            )
        lines.append("")
    lines += ["## Checks", ""]
    lines += [f"- [{'x' if c['passed'] else ' '}] {c['check']}" for c in results["checks"]]
    if results["problems"]:
        lines += ["", "Problems: " + "; ".join(results["problems"])]
    lines += [
        "",
        "Files: `rehearsal.json` (every number), `locust_*.csv`, `locust_summary.json`, `logs/` (each "
        "gateway process, nginx config and logs, Prometheus, Locust).",
        "",
    ]
    return "\n".join(lines)

"""One-command benchmark: server CPU per delivered token against a raw ASGI app (interleaved rounds), relay
capacity, the price of every protection, proxy overhead, RSS per stream, admission and resume-store costs.

Run: `python -m loadtest.bench [--quick] [--rounds N] [--at STREAMS] [--wait-quiet 600] [--profile]
[--baseline-src DIR] [--fleet] [--fleet-streams N] [--side-by-side] [--side-by-side-streams N]
[--output loadtest/results/benchmark.md]`.
Starts every server it measures on 127.0.0.1 through loadtest/harness/ (the gateways on sockets bound here
and handed over, the others on free ports; its own redis-server, when one is installed), drives them with
`loadtest.loadgen` in a separate process (so starting servers and sampling psutil never steal its loop), stops
them all and prints a Markdown report, which it also writes to `--output`. Server logs go next to the report.

The configurations compared: the raw-ASGI app (`loadtest.raw_asgi_app`, same events and pace: the reference),
the gateway "protections on" as shipped (rate limit and slots on, set high enough never to refuse the
benchmark's clients; breaker on; resume on, local store), "protections off" (no rate limit, no resume, slot caps
out of reach; the breaker cannot be switched off), resume off (everything else as shipped), RESUME_STORE=redis
(REDIS_URL set, so rate limits and per-client slots go through Redis too), and with `--baseline-src DIR` the
shipped configuration from another checkout. All on the built-in mock (or the raw app's own pace) at 20 tok/s.

Phases, each with only its own servers running (redis-server idles through the others):
0. admission cost per request, in process (`loadtest.admission_bench`): memory, shared memory, Redis;
1. RSS per open stream (the shipped gateway, on an instance of its own); capacity of the shipped gateway on
   `/stream`, then its replay cost (local store);
2. capacity of every other configuration (full run only), then the replay cost (Redis);
3. the interleaved rounds, one configuration after another: at one concurrency (`--at`, 1,000
   streams by default; with `--levels`, where the shipped gateway's search ended), `--rounds` rounds (3; quick 2),
   each running every configuration once on a fresh server, the order rotated by one place per round (round 1:
   A B C ..., round 2: B C ... A). Per configuration the report gives the median and the spread (min-max) of
   server CPU per delivered token (the whole process tree, psutil from /proc) and its ratio to the raw app,
   taken within each round, beside capacity, TTFT p50/p99 and the share of tokens delivered;
3b. the side-by-side rounds (`side_by_side`; `--side-by-side` runs them alone), the headline: every
   configuration at the same time, each on a fresh server under its own load (`--side-by-side-streams`, 100
   each), server CPU per delivered token over one common window once every load is steady, the ratio to the raw
   app within each round, then median and min-max over `--rounds` rounds;
4. fake_openai (20 tok/s), streamed straight and through a gateway (`UPSTREAM_URL`): TTFT added;
5. the fleet (`fleet`; `--fleet` runs it alone): three fake model servers, one slow, behind one gateway,
   `--fleet-streams` concurrent `/v1` streams (240; quick 150), UPSTREAM_BALANCE least_in_flight against
   round_robin in interleaved rounds: streams per endpoint (max / mean), the slow one's share, TTFT.

A capacity level passes with TTFT p99 <= 300 ms, zero errors and >= 95% of demanded tokens delivered in
time. On a shared machine other processes skew every number: a level (or the proxy load) during which they
used more than INTERFERENCE_CORES is run again once the machine is quiet, up to INTERFERENCE_RETRIES times.
The shipped gateway climbs the level ladder from the bottom until a level fails; in a full run the other
configurations start at the level it reached and climb or descend from it; then each bracket [highest pass,
lowest fail] is bisected `refine` times. `--quick` runs levels 450 and 1500 on the shipped gateway, no bisection,
and the other configurations only in the rounds (their capacity is whether the rounds' level passed).
`--profile` adds py-spy runs (every worker) under the loads behind missed targets: the first failing level,
450 streams, the proxy load; the report lists what dominates.

Modules: `plan` (targets, configurations, plans), `servers` (the processes measured), `measure` (load, CPU,
capacity searches), `rounds` (the interleaved rounds and their medians, spreads and ratios), `side_by_side` (the
side-by-side rounds), `fleet` (the fleet section's rounds), `profile` (py-spy),
`report` (the Markdown), `__main__` (the phases in order).
"""

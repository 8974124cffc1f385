"""One-command benchmark: relay capacity, the raw-ASGI ceiling, the price of every protection,
proxy overhead, RSS per stream, admission cost, and the resume store's capacity and replay cost.

Run: `python -m loadtest.bench [--quick] [--wait-quiet 600] [--profile] [--baseline-src DIR]
[--output loadtest/results/benchmark.md]`.
Starts every server it measures on 127.0.0.1 through loadtest/harness/ (the gateways on sockets bound here
and handed over, the others on free ports; its own redis-server, when one is installed), drives them with
`loadtest.loadgen` in a separate process (so starting servers and sampling psutil never steal its loop), stops
them all and prints a Markdown report, which it also writes to `--output`. Server logs go next to the report.

Phases, each with only its own servers running (redis-server idles through the others):
0. admission cost per request, in process (`loadtest.admission_bench`): memory, shared memory, Redis;
1. gateway "protections on" - the configuration as shipped (rate limit and slots on, set high enough
   never to refuse the benchmark's clients; breaker on; resume on, local store) on the built-in mock at
   20 tok/s: RSS per open stream (on an instance of its own), capacity on `/stream`, then the replay
   cost (local store);
2. the raw-ASGI app (`loadtest.raw_asgi_app`, same events and pace): its capacity, the ceiling;
3. gateway "protections off" (no rate limit, no resume, slot caps out of reach; the breaker cannot be
   switched off): its capacity - protections may cost at most 10% of it;
4. gateway with resume off (everything else as shipped), and with RESUME_STORE=redis (REDIS_URL set,
   so rate limits and per-client slots go through Redis too): capacity, then the replay cost (Redis);
5. fake_openai (20 tok/s), streamed straight and through a gateway (`UPSTREAM_URL`): TTFT added.

A capacity level passes with TTFT p99 <= 300 ms, zero errors and >= 95% of demanded tokens delivered in
time. On a shared machine other processes skew every number: a level (or the proxy load) during which they
used more than INTERFERENCE_CORES is run again once the machine is quiet, up to INTERFERENCE_RETRIES times.
The "on" gateway climbs the level ladder from the bottom until a level fails; the other servers
start at the level the "on" gateway reached (so every configuration runs that level: CPU per token is
compared there) and climb or descend from it; then each bracket [highest pass, lowest fail] is bisected
`refine` times. `--quick` runs levels 450 and 1500 on the protected gateway, no bisection, and every other
server at the highest of those only.
`--profile` adds py-spy runs (every worker) under the loads behind missed targets: the first failing level,
450 streams, the proxy load; the report lists what dominates.
`--baseline-src DIR` adds the shipped configuration built from another checkout (A) against this tree's (B),
run alternately A B A B ... (`Plan.baseline_rounds` rounds), and reports both with the ratios B / A of CPU per
delivered token and of capacity.

Modules: `plan` (targets, configurations, plans), `servers` (the processes measured), `measure` (load, CPU,
capacity searches), `profile` (py-spy), `report` (the Markdown), `__main__` (the phases in order).
"""

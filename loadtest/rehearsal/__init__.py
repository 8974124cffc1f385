"""Rolling-restart rehearsal: what `kubectl rollout restart` does to the gateway, performed here under load.

    python -m loadtest.rehearsal [--duration 30] [--users 30] [--instances 3] [--drain-timeout S] [--prestop 2]
                                 [--mode full|short-drain|resume|models] [--models 3] [--min-ready 2]
                                 [--kill-grace 1]
                                 [--output-dir loadtest/results/rehearsal]

One command starts N gateway instances (`python -m app`, 2 workers each, the built-in mock at 20 tok/s, each on
its own loopback socket that this process binds once and hands over through socket activation, so a
replacement gets the same port), Debian's nginx in front of them configured like the chart's Ingress
(loadtest/nginx.conf.template: no buffering, long timeouts, HTTP/1.1 keep-alive upstream, WebSocket upgrades,
a 503 from a draining instance retried on the next one), a real Prometheus scraping every instance each second
(label `instance="gw-N"`), and Locust headless (loadtest/locustfile.py, host = nginx). While Locust runs, one
instance at a time goes through the pod termination sequence:

    removed from nginx's upstream (config rewritten, reload, the new configuration answers)
    → preStop wait → SIGTERM to the gunicorn master → drain → exit (the drain time is SIGTERM → exit)
    → replacement started on the same socket → its /ready answers 200 → added back (reload) → next instance

At the end it writes to the output directory: `report.md` (also printed), `rollout.png` (active connections per
instance and TTFT p95 from Prometheus, a marker at each SIGTERM), `rehearsal.json` (every number), Locust's
CSVs and summary, and `logs/` (gateways, nginx, Prometheus, Locust). Exit code 0 only when no stream was
truncated, none ended in an error, every instance drained, exited and was replaced, and the mode's expectation
held:

    full         drain timeout (30 s) longer than the streams (~7.5 s): every stream finishes, no server_shutdown
    short-drain  drain timeout (2 s) shorter than the streams: the streams still running at the deadline end with
                 server_shutdown (graceful > 0), none ends silently (truncated = 0); Locust users reconnect
    resume       RESUME_STORE=redis on a real redis-server, short drains: a stream still running at the deadline
                 is handed to the fleet and its client gets server_shutdown with a resume id. The Locust users
                 resume such streams and check the text; besides them the rehearsal runs its own resuming SSE
                 clients through nginx (--resume-clients, streams twice as long as Locust's, so most span a
                 drain deadline): each reconnects with Last-Event-ID
                 via GET /stream/{id} and checks that the events continue without a gap or duplicate and that
                 the text equals the mock's uninterrupted answer. Expectation: every server_shutdown they saw
                 carried a resume id and was resumed to `done` with the whole text.
    models       the gateways stay (2 by default) and the MODEL SERVERS roll, as a rollout of a model Deployment
                 does (models.py): --models fake model servers (loadtest/fake_openai.py at --tokens-per-second),
                 each the endpoint of an EndpointSlice on an API server in this process
                 (loadtest/harness/fake_apiserver.py), the gateways watching them (UPSTREAM_DISCOVERY=kubernetes,
                 UPSTREAM_CONTINUATION=vllm). Each in turn: its replacement started on a new port and added ready,
                 --min-ready seconds later (minReadySeconds) the old one marked terminating (no new streams),
                 SIGKILLed --kill-grace seconds later (it does not drain: its streams die mid-stream), its slice
                 deleted. Locust's /stream and /ws users check every text against the fake's (`tok0 tok1 ...`).
                 Expectation: 0 failed, 0 truncated and 0 refused streams, and streams in flight at the kills; the
                 report counts the streams the gateways continued.

Locust runs for --duration seconds, or longer when the rollout needs it: it stops --cooldown seconds after the
last instance is back (SIGTERM: streams cut by the load test's own stop are counted `aborted`, not truncated).
All clients reach the gateways through nginx from 127.0.0.1, so the per-client limits are lifted
(RATE_LIMIT_PER_MINUTE=0, MAX_CONNECTIONS_PER_CLIENT=10000); everything listens on loopback only.

Every process started here runs in its own process group and is stopped with it (also on Ctrl-C or SIGTERM).
`processes.json` in the output directory lists them while the run lasts, for `kill_recorded()` (tests use it
as a backstop if this process itself was killed).

Modules: `run` (the instances, the rollout, the checks), `models` (the model servers and their roll), `measure`
(logs, the resuming clients, Prometheus series, Locust's statistics), `report` (the picture and the Markdown),
`__main__` (the options); the processes come from loadtest/harness/.
"""

from __future__ import annotations

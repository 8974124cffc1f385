"""The processes a test, the benchmark or the rehearsal runs on loopback, in one place.

- `ports`: listening sockets to hand over (race-free) and, for children that must bind themselves, a free port;
- `wait`: `wait_until(condition, timeout, what)`, failing with a readable message;
- `process`: `Child` (a process group with its own log, stopped with SIGTERM then SIGKILL, always reaped),
  `Supervisor` (every child of a run, stopped in reverse order), `socket_activation` (listening sockets handed
  to gunicorn on fds 3, 4, ...) and `require_binary`;
- `redis`, `prometheus`, `nginx`: Debian's redis-server, Prometheus and nginx on loopback;
- `fake_apiserver`: a Kubernetes API server for EndpointSlices only (list and watch, every object validated
  against the Kubernetes schema): what UPSTREAM_DISCOVERY=kubernetes watches in the tests and the rehearsal.

tests/ imports this package; nothing here imports tests/ (tests/test_layering_tools.py checks it), and nothing
here imports pytest: a missing binary or a server that does not start raises `HarnessError`.

Why not pytest-redis or pytest-xprocess: both are pytest plugins (fixtures), and the benchmark and the rehearsal
run without pytest; pytest-xprocess keeps processes alive across test sessions, the opposite of a run that
reaps everything it started; and neither hands over a listening socket or holds a process group until its
last signal. What they would replace here is a few dozen lines.
"""

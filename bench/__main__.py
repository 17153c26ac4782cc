"""``make bench``: the service as real processes under ``wrk``, against baselines on the same cores.

Absolute numbers on a shared 2-core machine mean little; ratios against a baseline measured
moments before, on the same cores, under the same load generator, do. So every figure has one:

- requests: the service (``python -m uvicorn src.main:app``, production settings, PostgreSQL,
  Redis, a Kafka-protocol broker) against a bare FastAPI app (``bench/bare.py``) served by the
  identical uvicorn command, answering bodies of the same shape and size;
- login and registration: raw argon2id verifications (hashes) per second on the same cores;
- the outbox relay: a bare aiokafka producer sending the same bytes (``bench/relay.py``).

Baseline and subject alternate in rounds (ABBA: a drift in the machine's load favours neither),
and medians are reported. The report goes to stdout and to the bench's section of
BENCHMARKS.md (``bench/report.py``). Then the account oracle (``bench/oracle.py``) and start-up
(``bench/startup.py``) run, as before.

Exits non-zero only when something is broken (a server does not start, wrk is missing), never
because a target is missed. ``BENCH_QUICK=1``: one round of 2 s runs, to check the harness.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from urllib.parse import urlencode

import httpx

from bench import oracle, startup
from bench.relay import RelayFigures
from bench.relay import measure as measure_relay
from bench.report import (
    MET,
    MISSED,
    Report,
    Row,
    cpu_model,
    markdown,
    text_table,
    verdict,
    write_section,
)
from bench.seed import PASSWORD, Seeded, refresh_tokens, seed
from bench.stack import (
    LIVE,
    REPO,
    BenchDatabase,
    BenchRedis,
    Server,
    rss_mib,
    service_environment,
    settings_from,
    start_broker,
    stop_broker,
    write_secrets,
)
from bench.wrk import (
    WrkResult,
    WrkRun,
    find_wrk,
    finish_wrk,
    raise_open_files_limit,
    refresh_script,
    register_script,
    run_wrk,
    start_wrk,
    static_script,
)
from src.config.settings import Settings
from tests.support.servers import KafkaBroker

QUICK = os.environ.get("BENCH_QUICK") == "1"
ROUNDS = 1 if QUICK else 3
SECONDS = 2.0 if QUICK else 4.0
OVERLOAD_SECONDS = 3.0 if QUICK else 8.0
CONNECTIONS = 64
LOGIN_CONNECTIONS = 16
OVERLOAD_CONNECTIONS = 1000
EXTRA_USERS = 60 if QUICK else 200
RELAY_RATE = 100.0
RELAY_SECONDS = 2.0 if QUICK else 5.0
RELAY_BURST = 1000 if QUICK else 5000
MEMORY_RUNS = 3
ADMIN = ("bench-admin@example.com", "bench-admin-horse-battery-staple")
API = "/api/v1"
BENCHMARKS = REPO / "BENCHMARKS.md"


# --- measuring in alternating rounds ------------------------------------------------------------


@dataclass
class Pair:
    """Every run of a subject and its baseline, in alternating rounds."""

    subject: list[WrkResult] = field(default_factory=list)
    baseline: list[WrkResult] = field(default_factory=list)

    @staticmethod
    def _median(results: list[WrkResult], value: Callable[[WrkResult], float]) -> float:
        return statistics.median(value(r) for r in results) if results else 0.0

    def rate(self, side: str) -> float:
        return self._median(getattr(self, side), lambda r: r.requests_per_sec)

    def p50(self, side: str) -> float:
        return self._median(getattr(self, side), lambda r: r.p50_ms)

    def p99(self, side: str) -> float:
        return self._median(getattr(self, side), lambda r: r.p99_ms)

    @property
    def ratio(self) -> float:
        baseline = self.rate("baseline")
        return self.rate("subject") / baseline if baseline else 0.0


def alternate(
    subject: Callable[[], WrkResult], baseline: Callable[[], WrkResult], rounds: int = ROUNDS
) -> Pair:
    """ABBA: baseline, subject; subject, baseline; ... so a drift in the machine's load (other
    work runs on it) favours neither side."""
    pair = Pair()
    order: list[tuple[list[WrkResult], Callable[[], WrkResult]]] = [
        (pair.baseline, baseline),
        (pair.subject, subject),
    ]
    for _ in range(rounds):
        for results, measure in order:
            results.append(measure())
        order.reverse()
    return pair


def rate_only(rate: float) -> WrkResult:
    """A baseline that has a rate but no latencies (raw argon2id)."""
    return WrkResult(requests_per_sec=rate, p50_ms=0.0, p99_ms=0.0, requests=0)


def _fmt_rate(pair: Pair, side: str, unit: str = "req/s", latency: bool = True) -> str:
    text = (
        f"{pair.rate(side):,.0f} {unit}"
        if pair.rate(side) >= 100
        else f"{pair.rate(side):.1f} {unit}"
    )
    if latency and (pair.p50(side) or pair.p99(side)):
        text += f", p50 {pair.p50(side):.1f} ms, p99 {pair.p99(side):.1f} ms"
    return text


def _errors(results: list[WrkResult]) -> str:
    """Non-2xx answers (by status), timeouts and socket errors over some runs; "" when none."""
    statuses: Counter[int] = Counter()
    for result in results:
        statuses.update({code: n for code, n in result.statuses.items() if code >= 300})
    timeouts = sum(r.timeouts for r in results)
    sockets = sum(r.socket_errors for r in results)
    parts = [f"{n} x {code}" for code, n in sorted(statuses.items())]
    unlabelled = sum(r.non_2xx for r in results) - sum(statuses.values())
    if unlabelled > 0:
        parts.append(f"{unlabelled} non-2xx")
    if timeouts:
        parts.append(f"{timeouts} timeouts")
    if sockets:
        parts.append(f"{sockets} socket errors")
    return ", ".join(parts)


# --- the run -------------------------------------------------------------------------------------


def _log_message(line: str) -> str:
    """A log line without its time and level, ``logger: message``, from a text line (a timestamp
    first) or from a JSON one (production's format), so repeats count as one."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError, LookupError, TypeError):
            entry = json.loads(line)
            return f"{entry['logger']}: {entry['message']}"
    parts = line.split(" ", 2)
    return parts[2] if len(parts) == 3 and parts[0][:2] == "20" else line


class Bench:
    """Owns everything the run starts, and tears it down in ``close`` whatever happened."""

    def __init__(self, wrk: str, workdir: Path) -> None:
        self.wrk = wrk
        self.workdir = workdir
        self.database = BenchDatabase()
        self.redis = BenchRedis()
        self.broker: KafkaBroker | None = None
        self.servers: list[Server] = []
        self.report = Report()
        self.env: dict[str, str] = {}
        self.settings: Settings | None = None
        self.seeded: Seeded | None = None
        self.bodies = workdir / "bare-bodies.json"
        self.server_log_lines: Counter[str] = Counter()
        # Resident memory of the service after each /users/me run of figure a (figure j).
        self.memory_after_runs: list[float] = []

    # --- servers -----------------------------------------------------------------------------
    def start_stack(self) -> None:
        pg_version = self.database.create()
        self.redis.start()
        settings_defaults = Settings.model_fields
        topics = [
            str(settings_defaults["KAFKA_USER_EVENTS_TOPIC"].default),
            str(settings_defaults["KAFKA_NOTIFICATIONS_TOPIC"].default),
        ]
        broker = start_broker(topics)
        self.broker = broker
        self.env = service_environment(
            self.workdir,
            self.database.url,
            self.redis,
            broker.bootstrap,
            ADMIN,
            write_secrets(self.workdir),
        )
        self.settings = settings_from(self.env)
        self.report.machine = {
            "CPU": cpu_model(),
            "cores": str(os.cpu_count()),
            "Python": platform.python_version(),
            "PostgreSQL": pg_version,
            "Redis": self.redis.version,
            "wrk": _wrk_version(self.wrk),
            "date": time.strftime("%Y-%m-%d"),
        }

    def service(self, workers: int) -> Server:
        server = Server("service", "src.main:app", self.env, self.workdir, LIVE, workers)
        self.servers.append(server)
        server.start()
        return server

    def bare(self, workers: int) -> Server:
        env = {
            "PATH": self.env["PATH"],
            "HOME": str(self.workdir),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "BENCH_BARE_BODIES": str(self.bodies),
        }
        server = Server("bare", "bench.bare:app", env, self.workdir, "/users/me", workers)
        self.servers.append(server)
        server.start()
        return server

    def stop(self, server: Server) -> None:
        server.stop()
        self.note_log(server)
        self.servers.remove(server)

    def close(self) -> None:
        """Every step on its own: one failing must not leave the others running."""
        for server in list(self.servers):
            with contextlib.suppress(Exception):
                server.stop()
        if self.broker is not None:
            with contextlib.suppress(Exception):
                stop_broker(self.broker)
        with contextlib.suppress(Exception):
            self.redis.stop()
        try:
            self.database.drop()
        except Exception as exc:  # noqa: BLE001 - reported, the rest of the teardown goes on
            print(f"could not drop database {self.database.name}: {exc}", file=sys.stderr)

    def note_log(self, server: Server) -> None:
        """Remember what the service logged (without timestamps), to report what it complained
        about; called once per server, at its end."""
        if server.name != "service":
            return
        for line in server.log_since(0):
            self.server_log_lines[_log_message(line)[:160]] += 1

    # --- wrk helpers -----------------------------------------------------------------------------
    def script(self, name: str, text: str) -> Path:
        path = self.workdir / f"{name}.lua"
        path.write_text(text)
        return path

    def get(
        self, server: Server, path: str, token: str | None, connections: int
    ) -> Callable[[], WrkResult]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        script = self.script(f"get-{uuid.uuid4().hex[:6]}", static_script("GET", headers))
        run = WrkRun(server.base + path, script, connections, SECONDS)
        return lambda: run_wrk(self.wrk, run)

    def login_run(self, server: Server, email: str, connections: int = LOGIN_CONNECTIONS) -> WrkRun:
        body = urlencode({"grant_type": "password", "username": email, "password": PASSWORD})
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        script = self.script("login", static_script("POST", headers, body))
        return WrkRun(server.base + f"{API}/auth/login", script, connections, SECONDS)

    def argon2(self, kind: str) -> Callable[[], WrkResult]:
        assert self.settings is not None
        s = self.settings
        command = [
            sys.executable, "-m", "bench.argon2_rate", kind, str(SECONDS),
            str(s.ARGON2_TIME_COST), str(s.ARGON2_MEMORY_COST), str(s.ARGON2_PARALLELISM),
        ]  # fmt: skip

        def measure() -> WrkResult:
            out = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
            return rate_only(float(out.stdout.strip()))

        return measure

    def warm(self, *measures: Callable[[], WrkResult]) -> None:
        """One untimed pass each: caches, pools and JITs are warm before the rounds start."""
        for measure in measures:
            measure()

    # --- figures -------------------------------------------------------------------------------
    def requests(
        self,
        label: str,
        pair: Pair,
        target: str = "",
        judged: str = "",
        units: tuple[str, str] = ("req/s", "req/s"),
    ) -> None:
        """A row for a subject/baseline pair, and a note of what else the service answered."""
        self.report.rows.append(
            Row(
                label,
                _fmt_rate(pair, "subject", units[0]),
                _fmt_rate(pair, "baseline", units[1]),
                f"{pair.ratio:.2f}x",
                target,
                judged,
            )
        )
        errors = _errors(pair.subject)
        if errors:
            self.report.notes.append(f"{label}: the service answered {errors}.")

    def figures_requests(self, service: Server, bare: Server, suffix: str = "") -> Pair:
        """a, b, c: reads with a bearer token against the bare route."""
        seeded = self.seeded
        assert seeded is not None
        bare_me = self.get(bare, "/users/me", None, CONNECTIONS)
        me = self.get(service, f"{API}/users/me", seeded.user.access_token, CONNECTIONS)
        self.warm(bare_me, me)
        memory: list[float] = []

        def me_then_memory() -> WrkResult:
            result = me()
            memory.append(sum(rss_mib(pid) for pid in service.worker_pids()))
            return result

        pair_a = alternate(me_then_memory, bare_me)
        must = f"{MISSED} (must: {verdict(pair_a.ratio >= 0.4)})"
        judged = MET if pair_a.ratio >= 0.6 else must
        self.requests(f"a. GET /users/me{suffix}", pair_a, "≥0.6x (must ≥0.4x)", judged)
        p99_ok = pair_a.p99("subject") <= 2 * pair_a.p99("baseline")
        self.report.rows.append(
            Row(
                f"a. GET /users/me{suffix} p99",
                f"{pair_a.p99('subject'):.1f} ms",
                f"{pair_a.p99('baseline'):.1f} ms",
                f"{pair_a.p99('subject') / max(pair_a.p99('baseline'), 1e-9):.2f}x",
                "≤2x bare",
                verdict(p99_ok),
            )
        )
        self.memory_after_runs = memory
        if suffix:
            return pair_a
        by_id = self.get(
            service, f"{API}/users/{seeded.user.id}", seeded.admin.access_token, CONNECTIONS
        )
        self.warm(by_id)
        self.requests("b. GET /users/{id} (admin)", alternate(by_id, bare_me))
        bare_page = self.get(bare, "/users", None, CONNECTIONS)
        page = self.get(service, f"{API}/users?limit=50", seeded.admin.access_token, CONNECTIONS)
        self.warm(bare_page, page)
        self.requests("c. GET /users?limit=50 (admin)", alternate(page, bare_page))
        return pair_a

    def figure_login(self, service: Server, suffix: str = "") -> None:
        """d: logins per second against raw argon2id verifications per second."""
        assert self.seeded is not None
        run = self.login_run(service, self.seeded.user.email)
        login = lambda: run_wrk(self.wrk, run)  # noqa: E731 - a one-line measure
        raw = self.argon2("verify")
        self.warm(login)
        pair = alternate(login, raw)
        self.requests(
            f"d. POST /auth/login{suffix} ({LOGIN_CONNECTIONS} conns)",
            pair,
            "≥0.85x raw argon2",
            verdict(pair.ratio >= 0.85),
            ("logins/s", "argon2id verify/s"),
        )

    def figure_register(self, service: Server) -> None:
        """e: registrations per second against raw argon2id hashes per second."""
        prefix = f"reg-{uuid.uuid4().hex[:8]}"
        counter = iter(range(1000))

        def register() -> WrkResult:
            script = self.script(
                "register",
                register_script(f"{API}/auth/register", f"{prefix}-{next(counter)}", PASSWORD),
            )
            run = WrkRun(service.base + f"{API}/auth/register", script, LOGIN_CONNECTIONS, SECONDS)
            return run_wrk(self.wrk, run)

        pair = alternate(register, self.argon2("hash"))
        self.requests(
            f"e. POST /auth/register ({LOGIN_CONNECTIONS} conns)",
            pair,
            units=("registrations/s", "argon2id hash/s"),
        )

    def figure_refresh(self, service: Server, bare: Server) -> None:
        """f: refresh-token rotations per second, with a queue of live tokens per wrk thread."""
        assert self.seeded is not None
        email = self.seeded.user.email
        threads = 2
        per_thread = CONNECTIONS // threads

        def refresh() -> WrkResult:
            tokens = asyncio.run(refresh_tokens(service.base, email, CONNECTIONS))
            tokens_file = self.workdir / "refresh-tokens.txt"
            tokens_file.write_text("\n".join(tokens) + "\n")
            script = self.script(
                "refresh", refresh_script(f"{API}/auth/login", tokens_file, per_thread)
            )
            run = WrkRun(service.base + f"{API}/auth/login", script, CONNECTIONS, SECONDS, threads)
            return run_wrk(self.wrk, run)

        pair = alternate(refresh, self.get(bare, "/users/me", None, CONNECTIONS))
        self.requests(
            f"f. refresh_token grant ({CONNECTIONS} conns)",
            pair,
            units=("refreshes/s", "req/s (bare route)"),
        )

    def figure_me_during_logins(self, service: Server) -> None:
        """g: /users/me p99 while logins run flat out, against /users/me alone (16 conns each)."""
        assert self.seeded is not None
        me_script = self.script(
            "me16",
            static_script("GET", {"Authorization": f"Bearer {self.seeded.user.access_token}"}),
        )
        me_run = WrkRun(service.base + f"{API}/users/me", me_script, LOGIN_CONNECTIONS, SECONDS)
        login_run = self.login_run(service, self.seeded.user.email)
        logins: list[WrkResult] = []

        def alone() -> WrkResult:
            return run_wrk(self.wrk, me_run)

        def with_logins() -> WrkResult:
            background = start_wrk(self.wrk, login_run)
            try:
                return run_wrk(self.wrk, me_run)
            finally:
                logins.append(finish_wrk(background, login_run))

        pair = alternate(with_logins, alone)
        p99, p99_alone = pair.p99("subject"), pair.p99("baseline")
        login_rate = statistics.median(r.requests_per_sec for r in logins)
        self.report.rows.append(
            Row(
                f"g. GET /users/me p99 during logins ({LOGIN_CONNECTIONS}+{LOGIN_CONNECTIONS} "
                "conns)",
                f"{p99:.1f} ms (p50 {pair.p50('subject'):.1f}; {pair.rate('subject'):,.0f} req/s; "
                f"logins {login_rate:.1f}/s)",
                f"{p99_alone:.1f} ms alone (p50 {pair.p50('baseline'):.1f}; "
                f"{pair.rate('baseline'):,.0f} req/s)",
                f"{p99 / max(p99_alone, 1e-9):.2f}x",
            )
        )

    def figure_overload(self, service: Server) -> None:
        """h: 1,000 connections on one worker: rate, latency, errors, log lines, recovery."""
        assert self.seeded is not None
        soft = raise_open_files_limit(OVERLOAD_CONNECTIONS * 2 + 256)
        if soft < OVERLOAD_CONNECTIONS + 64:
            self.report.notes.append(
                f"h. overload: open-files limit {soft} is below the connections"
            )
        seeded = self.seeded
        targets = [
            ("/users/me", f"{API}/users/me", seeded.user.access_token),
            ("/users/{id}", f"{API}/users/{seeded.user.id}", seeded.admin.access_token),
            ("/users?limit=50", f"{API}/users?limit=50", seeded.admin.access_token),
        ]
        for label, path, token in targets:
            script = self.script(
                "overload", static_script("GET", {"Authorization": f"Bearer {token}"})
            )
            run = WrkRun(
                service.base + path, script, OVERLOAD_CONNECTIONS, OVERLOAD_SECONDS, 2, "5s"
            )
            lines_before = service.log_lines()
            headers = {"Authorization": f"Bearer {token}"}
            with PoliteClient(service.base + path, headers) as polite:
                result = run_wrk(self.wrk, run)
            ended = time.monotonic()
            answered_p99 = polite.p99_ms()
            recovery = _recovery(service.base + LIVE, ended)
            log_lines = service.log_lines() - lines_before
            answered_503 = result.statuses.get(503, 0)
            other = sum(n for code, n in result.statuses.items() if code >= 300 and code != 503)
            ours = (
                f"{result.requests_per_sec:,.0f} req/s, p50 {result.p50_ms:.0f} ms, "
                f"p99 {result.p99_ms:.0f} ms; 503: {answered_503} "
                f"({result.retry_after_503} with Retry-After); other non-2xx: {other}; "
                f"timeouts: {result.timeouts}; socket errors: {result.socket_errors}; "
                f"log lines: {log_lines}; live again in {recovery}; a polite client "
                f"(honours Retry-After): {len(polite.answered_ms)} answered, p99 "
                + (f"{answered_p99:.0f} ms" if answered_p99 is not None else "n/a")
                + f", {polite.refused} refused"
            )
            max_lines = int(OVERLOAD_SECONDS * 5)  # a rate-limited logger: a few lines a second
            fast_503 = (
                answered_503 > 0 and result.retry_after_503 == answered_503 and result.timeouts == 0
            )
            checks = [
                "answered p99 ≤1 s: " + verdict(answered_p99 is not None and answered_p99 <= 1000),
                f"503+Retry-After, no timeouts: {verdict(fast_503)}",
                f"logs ≤{max_lines} lines: {verdict(log_lines <= max_lines)}",
            ]
            self.report.rows.append(
                Row(
                    f"h. overload GET {label} ({OVERLOAD_CONNECTIONS} conns, "
                    f"{OVERLOAD_SECONDS:.0f} s)",
                    ours,
                    "",
                    "",
                    "answered p99 ≤1 s; excess gets fast 503 + Retry-After; logs rate-limited",
                    "; ".join(checks),
                )
            )

    def figure_relay(self) -> None:
        """i: the outbox relay against a bare producer (the service is stopped meanwhile)."""
        assert self.settings is not None
        figures: RelayFigures = asyncio.run(
            measure_relay(self.settings, RELAY_RATE, RELAY_SECONDS, RELAY_BURST)
        )
        self.report.rows.append(
            Row(
                f"i. relay, commit → on topic ({figures.steady_rate:.0f} events/s, one per commit)",
                f"p50 {figures.relay_p50_ms:.1f} ms, p99 {figures.relay_p99_ms:.1f} ms",
                f"bare producer, send → on topic: p50 {figures.bare_p50_ms:.1f} ms, "
                f"p99 {figures.bare_p99_ms:.1f} ms",
                f"{figures.relay_p50_ms / max(figures.bare_p50_ms, 1e-9):.2f}x (p50)",
            )
        )
        self.report.rows.append(
            Row(
                f"i. relay throughput (burst of {figures.burst})",
                f"{figures.relay_per_sec:,.0f} events/s",
                f"{figures.bare_per_sec:,.0f} events/s (bare aiokafka producer)",
                f"{figures.relay_per_sec / max(figures.bare_per_sec, 1e-9):.2f}x",
            )
        )
        self.report.notes += figures.notes

    def memory_row(
        self, service: Server, idle: float, after_runs: list[float], after_all: float
    ) -> None:
        runs = ", ".join(f"{m:.0f}" for m in after_runs)
        workers = len(service.worker_pids())
        self.report.rows.append(
            Row(
                f"j. resident memory, {workers} worker{'s' if workers > 1 else ''} (MiB, total)",
                f"idle {idle:.0f}; after each /users/me run {runs}; after all load {after_all:.0f}",
                "",
                f"{after_runs[-1] - after_runs[0]:+.1f} MiB over the runs" if after_runs else "",
            )
        )

    # --- the whole run -------------------------------------------------------------------------
    def run(self) -> None:
        started = time.monotonic()
        print("starting PostgreSQL database, Redis, tansu ...", flush=True)
        self.start_stack()
        service = self.service(1)
        assert self.settings is not None
        print("seeding accounts through the API ...", flush=True)
        self.seeded = asyncio.run(seed(service.base, ADMIN[0], ADMIN[1], EXTRA_USERS))
        self.bodies.write_text(
            json.dumps({"/users/me": self.seeded.me_body, "/users": self.seeded.page_body})
        )
        bare = self.bare(1)
        idle = self.rss(service)
        self.report.notes.append(
            f"bare app: {self.rss(bare):.0f} MiB resident at idle; "
            f"/users/me body {_size(self.seeded.me_body)} bytes, "
            f"/users?limit=50 page {_size(self.seeded.page_body)} bytes"
        )
        steps: list[tuple[str, Callable[[], object]]] = [
            ("a-c reads", lambda: self.figures_requests(service, bare)),
            ("d login", lambda: self.figure_login(service)),
            ("e register", lambda: self.figure_register(service)),
            ("f refresh", lambda: self.figure_refresh(service, bare)),
            ("g users/me during logins", lambda: self.figure_me_during_logins(service)),
            ("h overload", lambda: self.figure_overload(service)),
        ]
        for name, step in steps:
            print(f"figure {name} ...", flush=True)
            step()
        self.memory_row(service, idle, self.memory_after_runs, self.rss(service))
        self.stop(service)
        self.stop(bare)

        print("figure i relay ...", flush=True)
        self.figure_relay()

        print("figure k two workers ...", flush=True)
        service = self.service(2)
        bare = self.bare(2)
        idle = self.rss(service)
        self.figures_requests(service, bare, " (2 workers)")
        self.figure_login(service, " (2 workers)")
        self.memory_row(service, idle, self.memory_after_runs, self.rss(service))
        self.stop(service)
        self.stop(bare)
        self.report.duration_s = time.monotonic() - started

    def rss(self, server: Server) -> float:
        return sum(rss_mib(pid) for pid in server.worker_pids())


class PoliteClient:
    """One client that behaves during a flood: one request at a time, waiting as long as a 503's
    ``Retry-After`` says. wrk cannot tell the latency of answered requests from that of
    refusals; this client's answered requests can: their p99 is the "answered p99"."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._url, self._headers = url, headers
        self._stop = threading.Event()
        self.answered_ms: list[float] = []
        self.refused = 0
        self._thread = threading.Thread(target=self._run, name="polite-client", daemon=True)

    def __enter__(self) -> PoliteClient:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(headers=self._headers, timeout=10) as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    reply = client.get(self._url)
                except httpx.HTTPError:
                    continue
                if reply.status_code == 503:
                    self.refused += 1
                    self._stop.wait(float(reply.headers.get("retry-after", "1")))
                elif reply.status_code < 300:
                    self.answered_ms.append((time.perf_counter() - started) * 1000)

    def p99_ms(self) -> float | None:
        if not self.answered_ms:
            return None
        ordered = sorted(self.answered_ms)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _recovery(url: str, since: float, limit: float = 60.0) -> str:
    """How long until ``url`` answers 200 within 100 ms again."""
    with httpx.Client(timeout=5) as client:
        while time.monotonic() - since < limit:
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                reply = client.get(url)
                if reply.status_code == 200 and time.monotonic() - started < 0.1:
                    return f"{time.monotonic() - since:.2f} s"
            time.sleep(0.02)
    return f"more than {limit:.0f} s"


def _size(body: object) -> int:
    """Bytes of a body as FastAPI sends it (compact JSON)."""
    return len(json.dumps(body, separators=(",", ":")).encode())


def _wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).split("[")[0].strip() or "unknown"


def _method() -> list[str]:
    return [
        "Real processes: `python -m uvicorn src.main:app --host 127.0.0.1 --no-access-log "
        "--log-level warning --no-proxy-headers` (one worker; `--workers 2` for k), "
        "ENVIRONMENT=production, LOG_LEVEL=WARNING, generated ENCRYPTION_KEY and signing key, "
        "against the machine's PostgreSQL (a fresh database), Redis (db 13) and tansu "
        "(Kafka protocol, topics created first; idempotence off: tansu lacks InitProducerId).",
        "Login and registration throttles lifted for the run (10^9): their Redis counting "
        "still runs. Access tokens live 120 min (the run's tokens must not expire).",
        "Baseline: `bench/bare.py`, a bare FastAPI app under the identical uvicorn command, "
        "answering the service's real bodies (a /users/me body; a 50-user page for c).",
        f"Load: native `wrk`, 2 threads, {CONNECTIONS} connections ({LOGIN_CONNECTIONS} for "
        f"login and registration), {SECONDS:.0f} s per run, `--latency`; {ROUNDS} rounds, "
        "baseline and subject alternating ABBA; medians of req/s, p50 and p99.",
        "Login/registration baseline: raw argon2id verify/hash with the service's ARGON2_* "
        "parameters, a thread pool of os.cpu_count() threads in a separate process.",
        f"Overload: {OVERLOAD_CONNECTIONS} connections, {OVERLOAD_SECONDS:.0f} s, "
        "`--timeout 5s`; status codes counted by a Lua `response()` per thread; server log "
        "lines counted from its log file; recovery = until /health/live answers 200 in <100 ms. "
        "wrk's latencies mix answers and refusals, so the answered p99 is a polite client's "
        "(one request at a time, honouring Retry-After) during the flood.",
        f"Relay: the service's OutboxRelay and record_event in the bench process (service "
        f"stopped), {RELAY_RATE:.0f} events/s one per transaction for {RELAY_SECONDS:.0f} s, then "
        f"a burst of {RELAY_BURST}; baseline a bare aiokafka producer (acks=all, linger 5 ms) "
        "sending the same bytes; an aiokafka consumer times arrivals.",
        "Memory: VmRSS of the uvicorn worker processes.",
    ]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the same orderly teardown as Ctrl-C


def main() -> int:
    signal.signal(signal.SIGTERM, _on_sigterm)
    wrk = find_wrk()
    if wrk is None:
        print("wrk is not installed and could not be (apt-get install wrk)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="ums-bench-"))
    bench = Bench(wrk, workdir)
    bench.report.method = _method()
    try:
        bench.run()
    except KeyboardInterrupt:
        print("\ninterrupted: tearing down", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - reported with the servers' logs, then teardown
        print(f"\nthe benchmark broke: {exc}", file=sys.stderr)
        for server in bench.servers:
            print(f"--- {server.name} log ---\n{server.log_tail()}", file=sys.stderr)
        return 1
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    if bench.server_log_lines:
        top = bench.server_log_lines.most_common(8)
        bench.report.notes.append(
            "The service logged: " + "; ".join(f"{n} x `{message}`" for message, n in top)
        )
    print()
    print(text_table(bench.report.rows))
    for note in bench.report.notes:
        print(f"- {note}")
    write_section(BENCHMARKS, markdown(bench.report))
    print(f"\nwritten: {BENCHMARKS}")
    oracle.run()
    startup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

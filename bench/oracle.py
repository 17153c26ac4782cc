"""Account oracle: does a password-reset request take longer for an address that has an account?

An attacker times requests over a real socket, so this does too: the service runs as a real
uvicorn process (SQLite, no Redis, no Kafka), and ``wrk`` (a native load generator, not
a Python loop sharing the cores) sends reset requests for a known address and for unknown ones,
in alternating rounds. The unknown address is the baseline: the ratio of the medians should be
1.00 within noise, since the service answers before it does any work.

Throttles are lifted for the run so that the known address's request really does its full work
(a token, a sealed notification) after each answer.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx

from bench.stack import free_port, wait_until_answers
from bench.wrk import WrkRun, find_wrk, run_wrk, static_script
from src.db.session import upgrade_database

ROUNDS = 4
SECONDS = 4
CONNECTIONS = 1


def _script(directory: Path, name: str, email: str) -> Path:
    path = directory / f"{name}.lua"
    body = f'{{"email": "{email}"}}'
    path.write_text(static_script("POST", {"Content-Type": "application/json"}, body))
    return path


def _latencies(wrk: str, url: str, script: Path) -> tuple[float, float]:
    """(p50, p99) in milliseconds for one round."""
    result = run_wrk(wrk, WrkRun(url, script, CONNECTIONS, SECONDS, threads=1))
    return result.p50_ms, result.p99_ms


def run() -> None:
    wrk = find_wrk()
    if wrk is None:
        print("\naccount oracle: skipped (wrk is not installed: apt-get install wrk)")
        return
    workdir = Path(tempfile.mkdtemp(prefix="ums-bench-oracle-"))
    database_url = f"sqlite+aiosqlite:///{workdir}/oracle.db"
    upgrade_database(database_url)
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATA_DIR": str(workdir),
        "KAFKA_ENABLED": "false",
        # The throttles are lifted for the run: keep their flood of entries out of a shared Redis.
        "REDIS_ENABLED": "false",
        "LOG_LEVEL": "WARNING",
        "MAIL_RATE_LIMIT_PER_IP": str(10**9),
        "MAIL_RATE_LIMIT_PER_ADDRESS": str(10**9),
    }
    command = [sys.executable, "-m", "uvicorn", "src.main:app", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--no-proxy-headers", "--log-level", "warning"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_answers(f"{base}/api/v1/health/live", 30, server)
        known = f"known-{uuid.uuid4().hex[:8]}@example.com"
        body = {"email": known, "password": "bench-correct-horse-battery"}
        httpx.post(f"{base}/api/v1/auth/register", json=body, timeout=10).raise_for_status()
        scripts = {
            "known": _script(workdir, "known", known),
            "unknown": _script(workdir, "unknown", f"nobody-{uuid.uuid4().hex}@example.com"),
        }
        url = f"{base}/api/v1/auth/password-reset/request"
        results: dict[str, list[tuple[float, float]]] = {"known": [], "unknown": []}
        order = ["unknown", "known"]
        for _ in range(ROUNDS):
            for name in order:
                results[name].append(_latencies(wrk, url, scripts[name]))
            order.reverse()  # ABBA: a drift in the machine's load favours neither side
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str, index: int) -> float:
        return statistics.median(r[index] for r in results[name])

    baseline = (median("unknown", 0), median("unknown", 1))
    subject = (median("known", 0), median("known", 1))
    print(f"\naccount oracle: POST /auth/password-reset/request, wrk -c{CONNECTIONS}, real socket")
    print(f"ms p50/p99   unknown address   {baseline[0]:8.2f} / {baseline[1]:.2f}  (baseline)")
    print(
        f"ms p50/p99   known address     {subject[0]:8.2f} / {subject[1]:.2f}  "
        f"ratio {subject[0] / baseline[0]:.2f}"
    )

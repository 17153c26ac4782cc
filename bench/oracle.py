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
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from src.db.session import upgrade_database

ROUNDS = 4
SECONDS = 4
CONNECTIONS = 1
_LATENCY = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wrk() -> str | None:
    found = shutil.which("wrk")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True, check=False)
        found = shutil.which("wrk")
    return found


def _script(directory: Path, name: str, email: str) -> Path:
    path = directory / f"{name}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = \'{{"email": "{email}"}}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    return path


def _latencies(wrk: str, url: str, script: Path) -> tuple[float, float]:
    """(p50, p99) in milliseconds for one round."""
    output = subprocess.run(
        [wrk, "-t1", f"-c{CONNECTIONS}", f"-d{SECONDS}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = {pct: float(value) * _UNIT[unit] for pct, value, unit in _LATENCY.findall(output)}
    return found["50"], found["99"]


def run() -> None:
    wrk = _wrk()
    if wrk is None:
        print("\naccount oracle: skipped (wrk is not installed: apt-get install wrk)")
        return
    workdir = Path(tempfile.mkdtemp(prefix="ums-bench-oracle-"))
    database_url = f"sqlite+aiosqlite:///{workdir}/oracle.db"
    upgrade_database(database_url)
    port = _free_port()
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
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/api/v1/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.1)
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

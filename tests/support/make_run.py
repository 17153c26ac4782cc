"""``make run`` as a newcomer types it, in a scratch copy of the checkout, with its processes.

The copy holds the Makefile, ``alembic.ini`` and ``pyproject.toml`` and links to ``src`` and the
built ``.venv``: ``make run`` then finds the defaults the README describes (SQLite and DATA_DIR
under ``./data``, a ``.env`` of its own) in a directory of the test's, never in the checkout that
other test runs share. The virtualenv is the checkout's, already built, so make is told not to
rebuild it (``-o .venv/.installed``); everything after that is ``make run`` itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.servers import wait_for_port

REPO_ROOT = Path(__file__).resolve().parents[2]
COPIED = ("Makefile", "alembic.ini", "pyproject.toml")
LINKED = ("src", ".venv")


def scratch_checkout(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        (directory / name).write_bytes((REPO_ROOT / name).read_bytes())
    for name in LINKED:
        (directory / name).symlink_to(REPO_ROOT / name)
    return directory


def base_environment(home: Path) -> dict[str, str]:
    """A login shell's worth: no REDIS_*, KAFKA_*, SMTP_* or anything else of the test run."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "LANG": "C.UTF-8"}


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            # The command name is in parentheses and may hold spaces: split after it.
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] != "Z":
                parents[int(entry.name)] = int(stat[1])
    return parents


def _command(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return None


def descendants(pid: int) -> dict[int, str]:
    """Every live process below ``pid`` (whatever its session), with its command line."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: dict[int, str] = {}
    queue = list(children.get(pid, []))
    while queue:
        current = queue.pop()
        command = _command(current)
        if command is not None:
            found[current] = command
        queue.extend(children.get(current, []))
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@dataclass
class MakeRun:
    """One ``make run`` in its own process group; ``log`` collects everything it printed."""

    checkout: Path
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    seen: dict[int, str] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def start(self, timeout: float = 120) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["make", "-o", ".venv/.installed", "run", f"PORT={self.port}"],
                cwd=self.checkout,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, timeout=timeout)  # migrations, servers, then the imports
        except TimeoutError:
            self.kill()
            pytest.fail(f"make run did not listen on {self.port}:\n{self.log()[-4000:]}")

    def processes(self) -> dict[int, str]:
        """What runs below make now (remembered, so ``stop`` can check that it all ended)."""
        assert self.process is not None
        now = descendants(self.process.pid)
        self.seen.update(now)
        return now

    def port_of(self, label: str) -> int:
        """The port the launcher printed for ``label`` (Kafka, Redis, Mail)."""
        match = re.search(rf"\[dev\]\s+{label}\s+127\.0\.0\.1:(\d+)", self.log())
        assert match, self.log()
        return int(match.group(1))

    def interrupt(self, timeout: float = 60) -> int:
        """Ctrl-C at the terminal: SIGINT to the whole foreground process group."""
        assert self.process is not None
        self.processes()
        os.killpg(self.process.pid, signal.SIGINT)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"make run did not stop after SIGINT:\n{self.log()[-4000:]}")

    def survivors(self, timeout: float = 15) -> dict[int, str]:
        """Processes seen below make that are still alive after ``timeout`` (none, we hope)."""
        deadline = time.monotonic() + timeout
        while True:
            left = {
                pid: command
                for pid, command in self.seen.items()
                if alive(pid) and _command(pid) == command
            }
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def kill(self) -> None:
        """Clean-up whatever happened: every process below make, then make's group."""
        if self.process is None:
            return
        self.processes()
        for pid, command in self.seen.items():
            # Only the process we saw: a pid of one that ended may be someone else's by now.
            if alive(pid) and _command(pid) == command:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)


@contextlib.contextmanager
def make_run(checkout: Path, port: int, env: dict[str, str], log_path: Path) -> Iterator[MakeRun]:
    run = MakeRun(checkout, port, env, log_path)
    run.start()
    try:
        yield run
    finally:
        run.kill()

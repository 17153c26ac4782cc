"""Driving ``wrk`` and reading what it prints.

wrk is a native load generator: it does not share the GIL or the event loop with the process it
measures, so its figures are the server's, not a Python client's. Everything the bench needs
from a run (rate, latency percentiles, errors, status codes) is parsed here from wrk's text
output, by pure functions that ``tests/test_bench.py`` checks against real samples.

The Lua scripts all end with the same status counter: each thread counts responses per status
code (and 503s that carry ``Retry-After``, whatever its case: uvicorn sends header names in
lower case) and ``done()`` prints the totals as ``bench-status``
lines, because wrk itself only says "Non-2xx or 3xx responses" without saying which.
Baseline and subject always run the same script shape, so both pay the same Lua cost.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY_LINE = re.compile(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s+(\d+) requests in ", re.MULTILINE)
_NON_2XX = re.compile(r"^\s+Non-2xx or 3xx responses:\s+(\d+)", re.MULTILINE)
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_STATUS = re.compile(r"^bench-status (\d+) (\d+)$", re.MULTILINE)
_RETRY_AFTER = re.compile(r"^bench-503-retry-after (\d+)$", re.MULTILINE)


class WrkParseError(ValueError):
    """wrk printed something without a ``Requests/sec`` line: the run did not happen."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run, as wrk reported it (latencies in milliseconds)."""

    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int = 0
    connect_errors: int = 0
    read_errors: int = 0
    write_errors: int = 0
    timeouts: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    retry_after_503: int = 0

    @property
    def socket_errors(self) -> int:
        """Connect, read and write errors (timeouts are counted apart)."""
        return self.connect_errors + self.read_errors + self.write_errors


def parse_duration_ms(value: str, unit: str) -> float:
    """wrk prints durations as e.g. ``812.00us``, ``4.20ms``, ``1.03s``, ``1.20m``."""
    return float(value) * _UNIT_MS[unit]


def parse_wrk(output: str) -> WrkResult:
    """Read one wrk run's stdout (with ``--latency``, and our Lua ``done()`` lines if any)."""
    rate = _RATE.search(output)
    if rate is None:
        raise WrkParseError(f"no Requests/sec in wrk output: {output[-500:]!r}")
    percentiles = {
        float(pct): parse_duration_ms(value, unit)
        for pct, value, unit in _LATENCY_LINE.findall(output)
    }
    total = _TOTAL.search(output)
    non_2xx = _NON_2XX.search(output)
    socket = _SOCKET.search(output)
    connect, read, write, timeout = (int(g) for g in socket.groups()) if socket else (0, 0, 0, 0)
    statuses = {int(code): int(count) for code, count in _STATUS.findall(output)}
    retry_after = _RETRY_AFTER.search(output)
    return WrkResult(
        requests_per_sec=float(rate.group(1)),
        p50_ms=percentiles.get(50.0, 0.0),
        p99_ms=percentiles.get(99.0, 0.0),
        requests=int(total.group(1)) if total else 0,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        connect_errors=connect,
        read_errors=read,
        write_errors=write,
        timeouts=timeout,
        statuses=statuses,
        retry_after_503=int(retry_after.group(1)) if retry_after else 0,
    )


# --- finding wrk ----------------------------------------------------------------------------------


def find_wrk() -> str | None:
    """wrk from PATH; installed with apt-get when missing and we are root (as in CI images)."""
    found = shutil.which("wrk")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True, check=False)
        found = shutil.which("wrk")
    return found


def raise_open_files_limit(wanted: int) -> int:
    """Raise our soft ``RLIMIT_NOFILE`` towards ``wanted`` (wrk, our child, inherits it).

    1,000 connections need 1,000 descriptors in wrk and as many in the server; a soft limit of
    1024 (a common default) would turn the overload run into a test of ``ulimit``.
    Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


# --- Lua scripts ------------------------------------------------------------------------------

# Appended to every script: per-thread status counts, summed in the main state by done().
_COUNTER = """
local bench_threads = {}
function setup(thread)
  table.insert(bench_threads, thread)
  if bench_setup then bench_setup(thread) end
end
function response(status, headers, body)
  bench_statuses[status] = (bench_statuses[status] or 0) + 1
  if status == 503 then
    for name, _ in pairs(headers) do
      if string.lower(name) == "retry-after" then bench_retry_after = bench_retry_after + 1 end
    end
  end
  if bench_response then bench_response(status, headers, body) end
end
function done(summary, latency, requests)
  local totals = {}
  local retry_after = 0
  for _, thread in ipairs(bench_threads) do
    local counts = thread:get("bench_statuses")
    for code, count in pairs(counts) do totals[code] = (totals[code] or 0) + count end
    retry_after = retry_after + thread:get("bench_retry_after")
  end
  for code, count in pairs(totals) do
    io.write(string.format("bench-status %d %d\\n", code, count))
  end
  io.write(string.format("bench-503-retry-after %d\\n", retry_after))
end
bench_statuses = {}
bench_retry_after = 0
"""


def _lua_string(value: str) -> str:
    """A Lua string literal for ``value`` (long-bracket form: no escaping needed)."""
    level = "="
    while f"]{level}]" in value:
        level += "="
    return f"[{level}[{value}]{level}]"


def _headers_lua(headers: dict[str, str]) -> str:
    return "".join(
        f"wrk.headers[ {_lua_string(name)} ] = {_lua_string(value)}\n"
        for name, value in headers.items()
    )


def static_script(
    method: str = "GET", headers: dict[str, str] | None = None, body: str | None = None
) -> str:
    """The same request every time (only the status counter is dynamic)."""
    lines = f"wrk.method = {_lua_string(method)}\n" + _headers_lua(headers or {})
    if body is not None:
        lines += f"wrk.body = {_lua_string(body)}\n"
    return lines + _COUNTER


def register_script(path: str, run_prefix: str, password: str) -> str:
    """``POST /auth/register`` with a new address each time: run prefix, thread number, counter.

    A repeated address would be a 409 after the first, without the argon2 hash that makes up
    most of a real registration's cost.
    """
    return (
        f"local register_path = {_lua_string(path)}\n"
        f"local run_prefix = {_lua_string(run_prefix)}\n"
        f"local password = {_lua_string(password)}\n"
        "local next_thread = 0\n"
        "function bench_setup(thread)\n"
        "  next_thread = next_thread + 1\n"
        '  thread:set("thread_number", next_thread)\n'
        "end\n"
        "local counter = 0\n"
        "function request()\n"
        "  counter = counter + 1\n"
        '  local email = string.format("%s-%d-%d@example.com",\n'
        "    run_prefix, thread_number, counter)\n"
        '  local body = string.format(\'{"email":"%s","password":"%s"}\', email, password)\n'
        '  local headers = {["Content-Type"] = "application/json"}\n'
        '  return wrk.format("POST", register_path, headers, body)\n'
        "end\n" + _COUNTER
    )


def refresh_script(path: str, tokens_file: Path, per_thread: int) -> str:
    """``grant_type=refresh_token`` with live tokens only.

    Refresh tokens rotate, and presenting a used one again ends its whole session, so each
    thread keeps a queue of live tokens: ``setup`` hands every thread ``per_thread`` tokens (one
    per connection) from real logins, ``request`` takes one, ``response`` puts back the new one
    the service answered with. A connection has one request in flight at a time, so the queue
    never runs dry unless a refresh fails (then the request goes out with a dead token and
    counts as a non-2xx).
    """
    return (
        f"local token_path = {_lua_string(path)}\n"
        f"local tokens_file = {_lua_string(str(tokens_file))}\n"
        f"local per_thread = {per_thread}\n"
        "local all_tokens = {}\n"
        "for line in io.lines(tokens_file) do table.insert(all_tokens, line) end\n"
        "local handed_out = 0\n"
        "function bench_setup(thread)\n"
        "  local mine = {}\n"
        "  for i = 1, per_thread do mine[i] = all_tokens[handed_out + i] end\n"
        "  handed_out = handed_out + per_thread\n"
        '  thread:set("seed_tokens", table.concat(mine, ","))\n'
        "end\n"
        "local queue = nil\n"
        "function request()\n"
        "  if queue == nil then\n"
        "    queue = {}\n"
        '    for token in string.gmatch(seed_tokens, "[^,]+") do table.insert(queue, token) end\n'
        "  end\n"
        '  local token = table.remove(queue) or "spent"\n'
        '  local body = "grant_type=refresh_token&refresh_token=" .. token\n'
        '  local headers = {["Content-Type"] = "application/x-www-form-urlencoded"}\n'
        '  return wrk.format("POST", token_path, headers, body)\n'
        "end\n"
        "function bench_response(status, headers, body)\n"
        '  local token = body and string.match(body, \'"refresh_token":"([^"]+)"\')\n'
        "  if token then table.insert(queue, token) end\n"
        "end\n" + _COUNTER
    )


# --- running -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    """What to run: a URL, a Lua script, and the load's shape."""

    url: str
    script: Path
    connections: int
    seconds: float
    threads: int = 2
    timeout: str | None = None

    def command(self, wrk: str) -> list[str]:
        threads = min(self.threads, self.connections)
        command = [
            wrk,
            f"-t{threads}",
            f"-c{self.connections}",
            f"-d{max(1, round(self.seconds))}s",
            "--latency",
            "-s",
            str(self.script),
        ]
        if self.timeout is not None:
            command += ["--timeout", self.timeout]
        return [*command, self.url]


def start_wrk(wrk: str, run: WrkRun) -> subprocess.Popen[str]:
    """Start one wrk process (for running two loads at once); finish it with ``finish_wrk``."""
    return subprocess.Popen(
        run.command(wrk), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_wrk(process: subprocess.Popen[str], run: WrkRun) -> WrkResult:
    try:
        stdout, stderr = process.communicate(timeout=run.seconds + 60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise RuntimeError(f"wrk did not finish: {run.url}") from None
    if process.returncode != 0:
        raise RuntimeError(f"wrk failed ({process.returncode}) on {run.url}: {stderr.strip()}")
    if not _RETRY_AFTER.search(stdout):
        # Every script of ours ends by printing its counters; wrk reports a broken script on
        # stderr and then runs plain requests, which would be measured as if nothing happened.
        raise RuntimeError(f"wrk's Lua script failed on {run.url}: {stderr.strip()[:500]}")
    return parse_wrk(stdout)


def run_wrk(wrk: str, run: WrkRun) -> WrkResult:
    return finish_wrk(start_wrk(wrk, run), run)

"""The benchmark's parsers and report logic (``bench/``): pure functions, no servers.

A wrong parse would print a confident, wrong figure, so each is checked against real wrk output.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.relay import percentile
from bench.report import BEGIN, END, HEADING, replace_section
from bench.wrk import WrkParseError, WrkRun, parse_duration_ms, parse_wrk, static_script

# wrk 4.1.0 with --latency and one of our scripts (statuses printed by done()).
OVERLOADED = """\
Running 8s test @ http://127.0.0.1:41234/api/v1/users/me
  2 threads and 1000 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.35ms  301.20ms   2.86s    71.20%
    Req/Sec   301.45    120.33   610.00     66.00%
  Latency Distribution
     50%  764.00us
     75%    1.02s
     90%    1.40s
     99%    2.86s
  4712 requests in 8.04s, 1.53MB read
  Socket errors: connect 0, read 12, write 3, timeout 41
  Non-2xx or 3xx responses: 120
Requests/sec:    586.04
Transfer/sec:    194.88KB
bench-status 200 4592
bench-status 503 120
bench-503-retry-after 117
"""

CLEAN = """\
Running 4s test @ http://127.0.0.1:8000/users/me
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    18.77ms    5.01ms  60.12ms   80.00%
    Req/Sec     1.71k   200.00     2.00k    70.00%
  Latency Distribution
     50%   18.80ms
     75%   21.00ms
     90%   24.00ms
     99%  124.00ms
  13700 requests in 4.00s, 4.10MB read
Requests/sec:   3425.00
Transfer/sec:      1.02MB
"""


def test_a_clean_run() -> None:
    result = parse_wrk(CLEAN)
    assert result.requests_per_sec == 3425.0
    assert result.p50_ms == pytest.approx(18.8)
    assert result.p99_ms == pytest.approx(124.0)
    assert result.requests == 13700
    assert (result.non_2xx, result.timeouts, result.socket_errors) == (0, 0, 0)
    assert result.statuses == {}


def test_an_overloaded_run_with_every_kind_of_error() -> None:
    result = parse_wrk(OVERLOADED)
    assert result.requests_per_sec == pytest.approx(586.04)
    assert result.p50_ms == pytest.approx(0.764)  # microseconds
    assert result.p99_ms == pytest.approx(2860.0)  # seconds
    assert result.requests == 4712
    assert result.non_2xx == 120
    assert (result.connect_errors, result.read_errors, result.write_errors) == (0, 12, 3)
    assert result.timeouts == 41
    assert result.socket_errors == 15  # timeouts are counted apart
    assert result.statuses == {200: 4592, 503: 120}
    assert result.retry_after_503 == 117


def test_the_thread_stats_are_not_taken_forpercentiles() -> None:
    # "Latency 812.35ms ... 71.20%" has a percent sign too; only the distribution counts.
    assert parse_wrk(OVERLOADED).p50_ms != pytest.approx(812.35)


@pytest.mark.parametrize(
    ("value", "unit", "ms"),
    [("812.00", "us", 0.812), ("4.20", "ms", 4.2), ("1.03", "s", 1030.0), ("1.50", "m", 90_000.0)],
)
def test_durations(value: str, unit: str, ms: float) -> None:
    assert parse_duration_ms(value, unit) == pytest.approx(ms)


def test_output_without_a_rate_is_an_error() -> None:
    with pytest.raises(WrkParseError):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_the_command_has_the_load_shape() -> None:
    run = WrkRun("http://h/x", Path("/t/s.lua"), connections=1000, seconds=8, timeout="5s")
    assert run.command("wrk") == [
        "wrk", "-t2", "-c1000", "-d8s", "--latency", "-s", "/t/s.lua", "--timeout", "5s",
        "http://h/x",
    ]  # fmt: skip
    # Never more threads than connections: wrk refuses that.
    assert WrkRun("http://h/x", Path("s.lua"), connections=1, seconds=4).command("wrk")[1] == "-t1"


def test_scripts_quote_values_without_breaking_lua() -> None:
    script = static_script("POST", {"Authorization": "Bearer a]]b"}, body='{"a": "]=]"}')
    # Long brackets of a level the value does not contain, and a space after "[" (Lua would
    # otherwise read "headers[[" as the start of a long string).
    assert "wrk.headers[ [=[Authorization]=] ] = [=[Bearer a]]b]=]" in script
    assert 'wrk.body = [==[{"a": "]=]"}]==]' in script


def testpercentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) == 0.0


# --- BENCHMARKS.md: the bench owns only its section --------------------------------------------


def test_a_new_file_gets_a_heading_and_the_markers() -> None:
    text = replace_section(None, "figures")
    assert text.startswith(HEADING)
    assert f"{BEGIN}\nfigures\n{END}\n" in text


def test_only_the_section_between_the_markers_is_replaced() -> None:
    existing = (
        f"# Benchmarks\n\n## Profile\n\nhand-written\n\n{BEGIN}\nold\n{END}\n\n## Later\nmore\n"
    )
    text = replace_section(existing, "new")
    assert (
        text
        == f"# Benchmarks\n\n## Profile\n\nhand-written\n\n{BEGIN}\nnew\n{END}\n\n## Later\nmore\n"
    )


def test_a_file_without_markers_keeps_everything_and_gains_the_section() -> None:
    existing = "# Benchmarks\n\n## Profile\nby hand\n"
    text = replace_section(existing, "new")
    assert text.startswith(existing.rstrip())
    assert text.endswith(f"{BEGIN}\nnew\n{END}\n")


def test_the_bench_counts_a_repeated_log_line_once_in_either_format() -> None:
    from bench.__main__ import _log_message

    text = "2026-11-29T18:07:16.930Z WARNING src.api.middleware: Overloaded: 1 refused"
    json_line = (
        '{"time": "2026-11-29T18:07:16.930Z", "level": "WARNING", '
        '"logger": "src.api.middleware", "message": "Overloaded: 1 refused", "request_id": "x"}'
    )
    assert (
        _log_message(text)
        == _log_message(json_line)
        == ("src.api.middleware: Overloaded: 1 refused")
    )
    assert _log_message("{not json") == "{not json"
    assert _log_message('{"message": "no logger"}') == '{"message": "no logger"}'

"""The report: a table on stdout, and the bench's section of BENCHMARKS.md.

BENCHMARKS.md is shared: the bench owns only what lies between ``<!-- bench:begin -->`` and
``<!-- bench:end -->``, and rewrites just that, so hand-written sections (a profile, notes)
survive every run. ``replace_section`` is pure, and tested.
"""

from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass, field
from pathlib import Path

BEGIN = "<!-- bench:begin -->"
END = "<!-- bench:end -->"
HEADING = (
    "# Benchmarks\n\n"
    "The section between the `bench:begin` and `bench:end` markers is written by `make bench`; "
    "edit around it.\n"
)

MET = "met"
MISSED = "missed"


@dataclass(frozen=True)
class Row:
    """One line of the table: our figure, its baseline, the ratio and the target, if any."""

    figure: str
    ours: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    verdict: str = ""


@dataclass
class Report:
    machine: dict[str, str] = field(default_factory=dict)
    method: list[str] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0


def verdict(ok: bool) -> str:
    return MET if ok else MISSED


def replace_section(existing: str | None, section: str) -> str:
    """``existing`` with the text between the markers replaced by ``section``.

    No file yet: a short heading and the markers. A file without markers: the section is
    appended, so nothing written by hand is ever lost. Text outside the markers is kept
    byte for byte.
    """
    block = f"{BEGIN}\n{section.strip()}\n{END}"
    if existing is None or not existing.strip():
        return f"{HEADING}\n{block}\n"
    start = existing.find(BEGIN)
    end = existing.find(END, start + len(BEGIN)) if start != -1 else -1
    if start == -1 or end == -1:
        return f"{existing.rstrip()}\n\n{block}\n"
    return existing[:start] + block + existing[end + len(END) :]


def write_section(path: Path, section: str) -> None:
    existing = path.read_text() if path.exists() else None
    path.write_text(replace_section(existing, section))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def text_table(rows: list[Row]) -> str:
    """Rows as blocks for a terminal: the cells are too long for one line each."""
    blocks = []
    for row in rows:
        lines = [row.figure, f"    ours      {row.ours}"]
        if row.baseline:
            lines.append(f"    baseline  {row.baseline}")
        if row.ratio:
            lines.append(f"    ratio     {row.ratio}")
        if row.target:
            lines.append(f"    target    {row.target}: {row.verdict}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: Report) -> str:
    """The bench's section of BENCHMARKS.md."""
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "## Measured by `make bench`",
        "",
        f"Run of {today}, {report.duration_s / 60:.1f} minutes.",
        "",
        "### Machine",
        "",
    ]
    lines += [f"- {name}: {value}" for name, value in report.machine.items()]
    lines += ["", "### Method", ""]
    lines += [f"- {item}" for item in report.method]
    lines += [
        "",
        "### Figures",
        "",
        "| figure | ours | baseline | ratio | target | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.rows:
        cells = (r.figure, r.ours, r.baseline, r.ratio, r.target, r.verdict)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if report.notes:
        lines += ["", "### Notes", ""]
        lines += [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"

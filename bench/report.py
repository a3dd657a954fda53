"""Benchmarks record their figures in `docs/benchmarks.md`: one `## ` section per benchmark,
replaced when the benchmark runs again, the other sections kept as they are."""

from __future__ import annotations

import datetime
import os
import platform
import re
from pathlib import Path

__all__ = ["DOCS", "machine", "pct", "table", "write_section"]

DOCS = Path(__file__).resolve().parent.parent / "docs"
_HEADER = "# Benchmarks\n\nFigures written by the scripts in `bench/`; each section says how to " \
          "run it again.\n"


def pct(values: list[float], q: float) -> float:
    """The `q` quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    """CPU model, cores, memory and load: what a reader needs to compare figures."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {mem_kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        memory = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} cores{memory}, {platform.system()} "
            f"{platform.release()}, Python {platform.python_version()}; load average "
            f"{load:.1f} at the start")


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(title: str, command: str, host: str, body: str,
                  docs: Path | None = None) -> Path:
    """Put `## title` (command, date, machine, then `body`) into docs/benchmarks.md (or into
    `docs`/benchmarks.md)."""
    docs = docs or DOCS
    docs.mkdir(exist_ok=True)
    path = docs / "benchmarks.md"
    text = path.read_text() if path.exists() else _HEADER
    today = datetime.date.today().isoformat()
    section = (f"## {title}\n\n```\n{command}\n```\n\nRun {today} on {host}.\n\n"
               f"{body.strip()}\n")
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
    return path

"""The short soak that runs in `make test` (`make soak` runs the long one): mixed traffic
through a real gateway for about 30 s, the ledger reconciled exactly, memory flat."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

from tests.e2e.conftest import Running
from tests.reliability.soak import KINDS, run_soak
from tests.reliability.stack import report

SECONDS = float(os.environ.get("LLMOPS_SOAK_SECONDS", "30"))


def test_short_soak_loses_nothing_and_holds_memory_flat(rel_folder: Path, upstream: Running
                                                        ) -> None:
    result = run_soak(SECONDS, rel_folder, upstream)
    report("short soak", **asdict(result))
    assert result.ok, result.problems
    assert set(result.by_kind) == set(KINDS) and min(result.by_kind.values()) >= 20
    # One record per request, and one per grounded request's search.
    assert result.ledger_records == result.sent + result.by_kind["rag"]
    assert result.missing_records == 0
    assert result.rss_samples >= 20

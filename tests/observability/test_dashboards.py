"""The Grafana dashboards: the JSON in the tree is what `observability.dashboards` writes, each
dashboard is well formed (unique panel ids and titles, a datasource variable, every panel a
query with a unit), and every query parses in a real Prometheus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from observability import dashboards
from tests.observability.prom import prometheus

FILES = sorted(dashboards.FOLDER.glob("*.json"))


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def exprs() -> list[str]:
    return [t["expr"] for path in FILES for p in load(path)["panels"]
            for t in p.get("targets", ())]


def test_files_are_what_the_module_writes(tmp_path: Path) -> None:
    written = dashboards.write(tmp_path)
    assert sorted(p.name for p in written) == [p.name for p in FILES]
    for path in written:
        assert path.read_text() == (dashboards.FOLDER / path.name).read_text(), (
            f"{path.name} is stale: run python -m observability.dashboards")


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_dashboard_is_well_formed(path: Path) -> None:
    board = load(path)
    assert board["schemaVersion"] >= 39 and board["uid"] == path.stem
    [variable] = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    assert len({p["title"] for p in panels}) == len(panels)
    for panel in panels:
        if panel["type"] == "row":  # a heading
            assert not panel.get("targets") and panel["gridPos"]["w"] == 24
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])


def test_every_query_parses(tmp_path: Path) -> None:
    queries = exprs()
    assert len(queries) > 30
    with prometheus(tmp_path) as prom:
        bad = {q: r.json()["error"] for q in queries if (r := prom.query(q)).status_code != 200}
        # And the check does catch a broken query.
        assert prom.query("sum by (model (rate(llmops_requests_total[1m]))").status_code == 400
    assert not bad

"""Preparing the offline models: cached, and one preparer at a time."""

from __future__ import annotations

import fcntl
import threading
from pathlib import Path

from llmops.cli.models import OFFLINE_MODELS, prepare_models


def prepared_home(tmp_path: Path) -> Path:
    for spec in OFFLINE_MODELS.values():
        folder = tmp_path / "models" / spec.folder
        folder.mkdir(parents=True)
        (folder / ".complete").touch()
    return tmp_path


def test_a_complete_folder_is_used_as_it_is(tmp_path: Path) -> None:
    home = prepared_home(tmp_path)
    said: list[str] = []
    dirs = prepare_models(home, log=said.append)
    assert dirs == {kind: home / "models" / spec.folder for kind, spec in OFFLINE_MODELS.items()}
    assert said == []  # nothing downloaded or rebuilt


def test_a_second_preparer_waits_for_the_first(tmp_path: Path) -> None:
    home = prepared_home(tmp_path)
    done = threading.Event()

    def prepare() -> None:
        prepare_models(home)
        done.set()

    with (home / "models" / ".lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a preparer at work
        waiting = threading.Thread(target=prepare)
        waiting.start()
        assert not done.wait(0.5)
    assert done.wait(10)
    waiting.join()

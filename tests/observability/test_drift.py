"""Drift detection's statistics on synthetic samples, and its windows in the real Redis."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import numpy as np
import pytest
from redis.asyncio import Redis

from llmops.settings import DriftConfig, Settings
from observability.drift import (
    DriftDetector,
    DriftWindows,
    Probe,
    Record,
    compare,
    is_empty_or_refusal,
    ks_test,
    mmd_test,
    rate_rise,
)

RNG = np.random.default_rng(7)


def gaussian(n: int, shift: float = 0.0, dims: int = 16) -> np.ndarray:
    return RNG.normal(size=(n, dims)) + shift


def test_mmd_separates_shifted_samples_and_not_equal_ones() -> None:
    same, null_same = mmd_test(gaussian(100), gaussian(100), 0.01, 200, RNG)
    moved, null_moved = mmd_test(gaussian(100), gaussian(100, shift=0.5), 0.01, 200, RNG)
    assert same < null_same
    assert moved > null_moved
    assert moved > 5 * same


def test_ks_flags_longer_answers_only_when_they_are() -> None:
    short = RNG.poisson(20, 200).astype(float)
    d_same, critical = ks_test(short, RNG.poisson(20, 200).astype(float), 0.01)
    d_long, _ = ks_test(short, RNG.poisson(40, 200).astype(float), 0.01)
    assert d_same < critical < d_long
    assert critical == pytest.approx(1.628 * np.sqrt(2 / 200), rel=1e-3)


def test_rate_rise_is_one_sided_and_floored() -> None:
    ref = np.zeros(100, dtype=bool)
    assert rate_rise(ref, ref, 0.01, 0.02) == (0.0, 0.02)  # no variance: the floor holds
    rose = np.r_[np.ones(30, dtype=bool), np.zeros(70, dtype=bool)]
    score, threshold = rate_rise(ref, rose, 0.01, 0.02)
    assert score == pytest.approx(0.3) and score > threshold
    fell, _ = rate_rise(rose, ref, 0.01, 0.02)
    assert fell == 0.0  # fewer refusals or errors is not an alarm


@pytest.mark.parametrize(("text", "flagged"), [
    ("", True), ("   \n", True),
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot assist with this request.", True),
    ("I\u2019m unable to share that.", True),
    ("As an AI, I don't have opinions.", True),
    ("Sure! Roast the potatoes at 200 C for 40 minutes.", False),
    ("I can help: first, preheat the oven.", False),
    ("The error means the key is missing; sorry for the confusion earlier.", False),
])
def test_empty_and_refusal_answers(text: str, flagged: bool) -> None:
    assert is_empty_or_refusal(text) is flagged


def test_records_keep_their_fields_in_a_few_hundred_bytes() -> None:
    emb = RNG.normal(size=384).astype(np.float16)
    data = Record(17, True, False, emb).encode()
    assert len(data) == 5 + 384 * 2
    back = Record.decode(data)
    assert (back.output_tokens, back.empty_or_refusal, back.failed) == (17, True, False)
    assert back.embedding is not None and np.array_equal(back.embedding, emb)
    assert Record.decode(Record(3, False, True).encode()).embedding is None


def records(n: int, shift: float = 0.0, tokens: int = 10, failed: bool = False
            ) -> list[Record]:
    return [Record(tokens, False, failed, e.astype(np.float16)) for e in gaussian(n, shift)]


def test_compare_needs_enough_samples_then_reports_each_signal() -> None:
    config = DriftConfig(min_samples=50, min_mmd=0.0)
    assert compare(records(49), records(100), config, RNG) == {}
    calm = compare(records(100), records(100), config, RNG)
    assert set(calm) == {"prompt_embedding", "output_length", "empty_or_refusal_rate",
                         "error_rate"}
    assert not any(s.drifted for s in calm.values()), calm
    stormy = compare(records(100), records(50, shift=1.0, tokens=40)
                     + records(50, shift=1.0, failed=True), config, RNG)
    assert {n for n, s in stormy.items() if s.drifted} == {
        "prompt_embedding", "output_length", "error_rate"}


@pytest.fixture
async def windows() -> AsyncIterator[DriftWindows]:
    redis = Redis.from_url(Settings().redis_url)
    prefix = f"llmops-test-{uuid.uuid4().hex[:12]}"
    yield DriftWindows(redis, prefix, window=3)
    keys = [k async for k in redis.scan_iter(f"{prefix}:*")]
    if keys:
        await redis.delete(*keys)
    await redis.aclose()


def tokens(rows: list[Record]) -> list[int]:
    return [r.output_tokens for r in rows]


async def test_the_reference_fills_first_then_the_recent_window_slides(
        windows: DriftWindows) -> None:
    await windows.push("m", [Record(t, False, False) for t in (1, 2)])
    ref, recent, times = await windows.read("m")
    assert (tokens(ref), tokens(recent), times) == ([1, 2], [], {})
    await windows.push("m", [Record(t, False, False) for t in (3, 4, 5, 6, 7)])
    ref, recent, times = await windows.read("m")
    assert tokens(ref) == [1, 2, 3]  # oldest first, complete
    assert tokens(recent) == [7, 6, 5]  # newest first, trimmed to the window
    assert "complete_at" in times
    assert await windows.models() == ["m"]


async def test_setting_the_reference(windows: DriftWindows) -> None:
    await windows.push("m", [Record(t, False, False) for t in range(1, 6)])
    await windows.reset("m", "recent")  # the recent window (4, 5) becomes the reference
    ref, recent, times = await windows.read("m")
    assert (tokens(ref), tokens(recent)) == ([4, 5], [])
    assert "set_at" in times and "complete_at" not in times
    await windows.push("m", [Record(t, False, False) for t in (6, 7)])
    ref, recent, _ = await windows.read("m")
    assert (tokens(ref), tokens(recent)) == ([4, 5, 6], [7])  # it fills up first
    await windows.reset("m", "next")
    assert tokens((await windows.read("m"))[0]) == []


async def test_a_blip_of_the_embedding_model_delays_samples_an_outage_drops_embeddings(
        windows: DriftWindows) -> None:
    calls = 0

    async def flaky(texts: list[str]) -> list[list[float]]:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise ConnectionError("embedding engine restarting")
        return [[1.0, 0.0]] * len(texts)

    detector = DriftDetector(DriftConfig(), windows, flaky)
    detector.record("m", Probe("a prompt", "an answer"), 5, failed=False)
    for _ in range(3):  # two failed rounds keep the sample queued; the third embeds it
        await detector.flush()
    (record,), _, _ = await windows.read("m")
    assert record.embedding is not None and calls == 3

    async def down(texts: list[str]) -> list[list[float]]:
        raise ConnectionError("embedding engine gone")

    gone = DriftDetector(DriftConfig(), windows, down)
    gone.record("m", Probe("another prompt", ""), 0, failed=False)
    for _ in range(2):
        await gone.flush()
    assert len((await windows.read("m"))[0]) == 1  # still waiting
    await gone.flush()
    ref, _, _ = await windows.read("m")
    assert len(ref) == 2 and ref[1].embedding is None and ref[1].empty_or_refusal

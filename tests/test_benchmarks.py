"""The benchmark scripts run on real data and report what docs/BENCHMARKS.md quotes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
import benchmark_step_time  # noqa: E402


@pytest.mark.slow
def test_step_time_benchmark_covers_every_head():
    results = benchmark_step_time.main(
        ["--head", "image", "point", "text", "--num_anchors", "10", "--steps", "2", "--warmup", "1"]
    )
    assert [result["head"] for result in results] == ["image", "point", "text"]
    assert [result["latent_size"] for result in results] == [32, 32, 256]
    for result in results:
        assert result["median_step_seconds_nvc"] > 0
        assert result["median_step_seconds_none"] > 0
        assert result["overhead_ratio"] == pytest.approx(
            result["median_step_seconds_nvc"] / result["median_step_seconds_none"], rel=1e-3
        )
        low, high = result["overhead_ratio_ci95"]
        assert 0 < low <= high

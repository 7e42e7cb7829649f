"""The time-to-target benchmark's summary: read off the curves, ratios of the seeds' means."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from time_to_target import summarize, table  # noqa: E402


def run(method, seed, losses, step_s=0.1, plan=""):
    """A run evaluated every 10 s (10 steps, 1 MB a step) with these test losses."""
    curve = [{"steps": 10 * i, "seconds": 10.0 * i, "test_loss": loss, "link_bytes": 10e6 * i}
             for i, loss in enumerate(losses)]
    return {"rate": "1gbit", "nodes": 2, "method": method, "seed": seed, "curve": curve,
            "step_s": step_s, "plan": plan}


def test_time_to_target_is_read_off_the_smoothed_curve_and_ratios_are_of_seed_means():
    # the target is met where the mean of three consecutive evaluations is at or below it
    runs = [run("fp32", 0, [2.0, 2.0, 2.0, 1.8, 1.8]), run("fp32", 1, [2.3, 2.1, 1.9, 1.8, 1.8]),
            run("torch-bf16", 0, [2.2, 2.0, 1.8, 1.8, 1.8]), run("torch-bf16", 1, [2.2, 2.0, 1.8, 1.8, 1.8]),
            run("calibrated:qsgd4", 0, [2.0, 1.9, 1.8, 1.7, 1.6], plan="qsgd4 everywhere"),
            run("calibrated:qsgd4", 1, [2.0, 1.9, 1.8, 1.7, 1.6], plan="qsgd4 everywhere"),
            run("qsgd2", 0, [3.0, 2.9, 2.8, 1.0, 1.0]), run("qsgd2", 1, [3.0, 2.9, 2.8, 2.7, 2.6])]
    rows = {r["method"]: r for r in summarize(runs, target=2.0, budget=30.0)}
    assert rows["fp32"]["target_seconds"] == pytest.approx(15.0)  # 0 s and 30 s
    assert rows["fp32"]["target_steps"] == pytest.approx(15.0)
    assert rows["fp32"]["target_link_mb"] == pytest.approx(15.0)
    assert rows["torch-bf16"]["target_seconds"] == pytest.approx(20.0)
    assert rows["calibrated:qsgd4"]["target_seconds"] == 0.0
    assert "sooner_than_fp32" not in rows["calibrated:qsgd4"]  # no ratio to a zero time
    # a single dip (2.8, 1.0) is not the target met: (2.9 + 2.8 + 1.0) / 3 > 2
    assert rows["qsgd2"]["target_seconds"] is None and "sooner_than_fp32" not in rows["qsgd2"]
    # the loss at the budget is the last evaluation within it (30 s), not a later one
    assert rows["qsgd2"]["loss_at_budget"] == pytest.approx((1.0 + 2.7) / 2)
    rows = {r["method"]: r for r in summarize(runs[:4], target=1.9, budget=40.0)}
    assert rows["fp32"]["target_seconds"] == pytest.approx(40.0)
    assert rows["torch-bf16"]["sooner_than_fp32"] == pytest.approx(40.0 / 30.0)
    assert rows["torch-bf16"]["sooner_than_torch-bf16"] == pytest.approx(1.0)
    text = table(list(rows.values()), 1.9, "40 s")
    assert "| 1gbit | 2 | torch-bf16 | 2 | 30.0 | 30 | 30 | 1.33x | 1.00x | 1.8000 | 100 |" in text
    text = table(list(summarize(runs, 2.0, 30.0)), 2.0, "30 s")
    assert "| 1gbit | 2 | qsgd2 | 2 | - | - | - | - | - |" in text
    assert "the target was not reached" in text and "qsgd4 everywhere" in text

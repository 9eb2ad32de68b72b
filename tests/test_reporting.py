"""What runs leave for people: percentiles for latency reports, the progress bar fed by reports."""

from __future__ import annotations

import pytest

from workloads.common.reporting import TrainProgress, percentile


def test_p99_is_the_nearest_rank_not_the_one_below_it():
    sixteen = [float(i) for i in range(1, 17)]
    assert percentile(sixteen, 99) == 16.0  # ceil(0.99 * 16) = 16th value; the old code took the 15th
    assert percentile(sixteen, 50) == 8.0
    assert percentile(list(range(200, 0, -1)), 99) == 198  # unsorted input; ceil(198.0) = 198th
    assert percentile([3.5], 99) == 3.5


@pytest.mark.parametrize("pct", [0, 101])
def test_percentile_rejects_what_has_no_rank(pct):
    with pytest.raises(ValueError, match="0 < pct <= 100"):
        percentile([1.0], pct)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_progress_bar_follows_reported_steps_and_keeps_the_last_eval_loss(capsys):
    with TrainProgress(10) as bar:
        bar.update({"step": 5, "loss": 2.5, "eval_loss": 2.25, "tokens_per_second": 1000.0})
        bar.update({"step": 8, "loss": 1.5, "tokens_per_second": 1200.0})
        bar.update({"restarts": 1})  # a row without a step is not progress
        assert bar._bar.n == 8
    shown = capsys.readouterr().err
    assert "8/10" in shown and "loss=1.500" in shown and "eval_loss=2.250" in shown and "tok/s=1200" in shown

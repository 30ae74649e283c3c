"""benchmarks/maspo_vs_grpo.py's bookkeeping, on hand-made metrics: samples counted with refills,
the target reached by a full moving-average window, the limiters' means, the table's rows."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from maspo_vs_grpo import curve, limiter_stats, samples_to_target, table  # noqa: E402


def _metrics(rewards, groups_seen, extra=None):
    return [{"step": 0, "eval/avg@4": 0.1}] + [
        {"step": i + 1, "reward/mean": r, "sampling/groups_seen": g, **(extra or {})}
        for i, (r, g) in enumerate(zip(rewards, groups_seen))]


def test_curve_counts_refills_and_target_needs_a_full_window():
    metrics = _metrics([0.6, 0.0, 0.0, 0.0, 0.3, 0.4], [2, 3, 2, 2, 2, 2])
    samples, smooth = curve(metrics, n_samples=8, window=3)
    assert samples.tolist() == [16, 40, 56, 72, 88, 104]  # groups seen x 8, refills included
    assert np.allclose(smooth, [0.6, 0.3, 0.2, 0.0, 0.1, 0.7 / 3])
    # Steps 1-2 (windows of one and two) do not count; the first full window >= 0.21 ends at step 6.
    assert samples_to_target(samples, smooth, 0.21, window=3) == 104
    assert samples_to_target(samples, smooth, 0.5, window=3) is None


def test_limiter_stats_per_loss():
    maspo = _metrics([0.1, 0.2], [1, 1])
    maspo[1].update({"actor/maspo/gated_frac_pos": 0.2, "actor/maspo/gated_frac_neg": 0.0,
                     "actor/maspo/sigma_mean": 2.0})
    maspo[2].update({"actor/maspo/gated_frac_pos": 0.0, "actor/maspo/gated_frac_neg": 0.1,
                     "actor/maspo/sigma_mean": 1.0})
    assert limiter_stats(maspo, "maspo") == (0.1, 0.05, 1.5, None)
    grpo = _metrics([0.1, 0.2], [1, 1], {"actor/grpo/clip_frac": 0.3})
    assert limiter_stats(grpo, "grpo") == (None, None, None, 0.3)


def test_table_rows_and_median_of_unreached_runs():
    results = {"sync": {
        "maspo": [(0, 100, 0.5, (0.1, 0.2, 1.5, None)), (1, 300, 0.7, (0.3, 0.0, 2.5, None))],
        "grpo": [(0, 200, 0.4, (None, None, None, 0.05)), (1, None, 0.2, (None, None, None, 0.15))],
    }}
    lines = table(results, target=0.4, window=5, steps=20).splitlines()
    assert lines[2].startswith("| pipeline | method | seed 0 | seed 1 | median | reached |")
    assert lines[4] == "| sync | maspo | 100 | 300 | 200 | 2/2 | 0.600 ± 0.100 | 0.200 | 0.100 | 2.000 | - |"
    # A run that never reached the target counts as infinitely slow: the median of (200, inf) is inf.
    assert lines[5] == "| sync | grpo | 200 | - | - | 1/2 | 0.300 ± 0.100 | - | - | - | 0.100 |"

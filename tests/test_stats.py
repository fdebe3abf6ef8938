"""experiments/stats.py: the intervals and verdict words every report uses."""

import math

import pytest

from experiments import stats

# Two-sided 95 % critical values of Student's t (standard tables).
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 9: 2.2622, 29: 2.0452}


@pytest.mark.parametrize("df,want", sorted(T975.items()))
def test_t_quantile_matches_the_tables(df, want):
    assert stats.t_quantile(0.975, df) == pytest.approx(want, abs=1e-4)
    assert stats.t_quantile(0.025, df) == pytest.approx(-want, abs=1e-4)
    assert stats.t_cdf(stats.t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-9)


def test_t_quantile_refuses_a_probability_outside_0_1():
    with pytest.raises(ValueError, match="0 < p < 1"):
        stats.t_quantile(1.0, 3)


def test_describe_drops_missing_and_nonfinite_values():
    d = stats.describe([1.0, None, 3.0, float("nan"), 2.0])
    assert d == {"mean": 2.0, "sd": 1.0, "n": 3}
    assert stats.describe([5.0]) == {"mean": 5.0, "sd": None, "n": 1}
    assert stats.describe([]) == {"mean": None, "sd": None, "n": 0}


def test_interval_is_the_paired_t_interval():
    diffs = [0.5, 0.6, 0.9, 0.2, 0.4]
    got = stats.interval(diffs)
    m, sd = sum(diffs) / 5, math.sqrt(sum((x - 0.52) ** 2 for x in diffs) / 4)
    half = 2.7764 * sd / math.sqrt(5)
    assert got["diff"] == pytest.approx(m) and got["n"] == 5
    assert got["lo"] == pytest.approx(m - half, abs=1e-4) and got["hi"] == pytest.approx(m + half, abs=1e-4)


def test_verdict_reads_the_interval_and_the_metric_direction():
    assert stats.verdict(0.1, 0.3, "higher") == "better"
    assert stats.verdict(0.1, 0.3, "lower") == "worse"
    assert stats.verdict(-0.3, -0.1, "lower") == "better"
    assert stats.verdict(-0.1, 0.3, "higher") == stats.NO_DIFFERENCE
    assert stats.verdict(None, None) == "n < 2"


def test_pairing_cancels_the_seed_effect_an_unpaired_spread_would_hide():
    # seeds differ a lot (spread ~1), the arm is better by 0.1 on every seed: paired says better
    ref = {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0, 4: 5.0}
    x = {s: v + 0.1 + 0.01 * s for s, v in ref.items()}
    p = stats.paired(x, ref, "higher")
    assert p["verdict"] == "better" and p["n"] == 5 and p["lo"] > 0
    # only seeds both arms have count; a missing / NaN seed is dropped, not imputed
    p = stats.paired({**x, 5: 9.0, 4: float("nan")}, ref, "higher")
    assert p["pairs"] == ["0", "1", "2", "3"] and p["n"] == 4
    # noise around zero: no difference detected
    p = stats.paired({0: 1.1, 1: 1.9, 2: 3.05}, {0: 1.0, 1: 2.0, 2: 3.0}, "higher")
    assert p["verdict"] == stats.NO_DIFFERENCE and p["lo"] < 0 < p["hi"]


def test_cells_show_n_and_the_interval():
    assert stats.fmt_describe({"mean": 0.5, "sd": 0.1, "n": 5}, ".2f") == "0.50 ± 0.10 (n=5)"
    assert stats.fmt_describe({"mean": None, "sd": None, "n": 0}, ".2f") == "–"
    p = stats.paired({0: 1.1, 1: 1.9, 2: 3.05}, {0: 1.0, 1: 2.0, 2: 3.0}, "higher")
    assert stats.fmt_paired(p, ".2f").endswith("no difference detected (n=3)")
    assert "no interval" in stats.fmt_paired(stats.paired({0: 1.0}, {0: 0.5}), ".2f")


def test_paired_records_compares_each_named_metric_of_per_seed_records():
    x = {"0": {"a": 1.1, "b": 5.0}, "1": {"a": 2.2, "b": None}, "2": {"a": 3.3, "b": 4.0}}
    ref = {"0": {"a": 1.0, "b": 6.0}, "1": {"a": 2.0, "b": 6.0}, "2": {"a": 3.0, "b": 6.0}}
    p = stats.paired_records(x, ref, {"a": "higher", "b": "lower"})
    assert set(p) == {"a", "b"}
    assert p["a"] == stats.paired({s: r["a"] for s, r in x.items()}, {s: r["a"] for s, r in ref.items()}, "higher")
    assert p["b"]["pairs"] == ["0", "2"] and p["b"]["diff"] == pytest.approx(-1.5) and p["b"]["n"] == 2

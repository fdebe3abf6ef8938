"""The statistics every report uses: per-arm mean, sd and n, and paired differences with a 95 % t-interval.

The rule of evidence (docs/design.md §7): two arms differ only when the paired 95 % confidence interval of
their difference excludes zero. Pairs are the same training seed on the same data and goals, so the seed's
shared luck (its dataset order, its evaluation streams) cancels; an unpaired comparison of two seed spreads
would be both weaker and, with seeds that co-vary, wrong.

    >>> paired({0: 1.0, 1: 2.0, 2: 3.5}, {0: 0.5, 1: 1.4, 2: 2.6}, better="higher")["verdict"]
    'better'

The Student t quantile is computed here (bisection on the t CDF) so the reports need no scipy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

LEVEL = 0.95  # two-sided confidence level of every interval in the reports
NO_DIFFERENCE = "no difference detected"


def finite(values: Iterable) -> list[float]:
    """The values that are numbers (None and NaN/inf dropped)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def describe(values: Iterable) -> dict:
    """{'mean', 'sd' (sample sd; None for n < 2), 'n'} over the finite values (mean None when there are none)."""
    v = finite(values)
    n = len(v)
    mean = sum(v) / n if n else None
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "n": n}


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with a whole number df of degrees of freedom (the reports' n - 1): the finite
    series in θ = atan(t / √df) of Abramowitz & Stegun 26.7.3-4."""
    th = math.atan(t / math.sqrt(df))
    term = s = 1.0 if df % 2 == 0 else math.cos(th)
    for j in range(df % 2 + 2, df, 2):
        term *= math.cos(th) ** 2 * (j - 1) / j
        s += term
    a = math.sin(th) * s if df % 2 == 0 else 2 / math.pi * (th + (math.sin(th) * s if df > 1 else 0.0))
    return 0.5 + 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t (p in (0, 1)), by bisection: exact to ~1e-10."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0 (got p={p}, df={df})")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    while hi - lo >= 1e-12:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def interval(diffs: Iterable) -> dict:
    """Mean of the (paired) differences with its two-sided t-interval: {'diff', 'lo', 'hi', 'sd', 'n'};
    lo/hi are None for n < 2 (no interval from one pair)."""
    d = describe(diffs)
    lo = hi = None
    if d["n"] >= 2:
        half = t_quantile(0.5 + LEVEL / 2.0, d["n"] - 1) * d["sd"] / math.sqrt(d["n"])
        lo, hi = d["mean"] - half, d["mean"] + half
    return {"diff": d["mean"], "lo": lo, "hi": hi, "sd": d["sd"], "n": d["n"]}


def verdict(lo: float | None, hi: float | None, better: str = "higher") -> str:
    """'better' / 'worse' when the interval excludes zero (in the metric's good direction or not), otherwise
    'no difference detected'; 'n < 2' when there is no interval."""
    if lo is None or hi is None:
        return "n < 2"
    if better not in ("higher", "lower"):
        raise ValueError(f"better must be 'higher' or 'lower', not {better!r}")
    if lo > 0 or hi < 0:
        up = lo > 0
        return "better" if up == (better == "higher") else "worse"
    return NO_DIFFERENCE


def paired(x: Mapping, ref: Mapping, better: str = "higher") -> dict:
    """x − ref over the keys (seeds) both have a finite value for: the interval of `interval` plus the
    verdict words and the keys used."""
    keys = sorted(k for k in set(x) & set(ref) if finite([x[k]]) and finite([ref[k]]))
    out = interval([float(x[k]) - float(ref[k]) for k in keys])
    return {**out, "verdict": verdict(out["lo"], out["hi"], better), "pairs": [str(k) for k in keys],
            "level": LEVEL}


def fmt_describe(d: dict, fmt: str) -> str:
    """'mean ± sd (n=k)' for a table cell; '–' without a value. n is always shown: the reader must see it."""
    if d.get("mean") is None:
        return "–"
    sd = "" if d.get("sd") is None else f" ± {format(d['sd'], fmt)}"
    return f"{format(d['mean'], fmt)}{sd} (n={d['n']})"


def fmt_paired(p: dict, fmt: str) -> str:
    """'+0.123 [−0.010, +0.250], no difference detected (n=5)' for a table cell."""
    if p.get("diff") is None:
        return "–"
    if p.get("lo") is None:
        return f"{format(p['diff'], '+' + fmt)} (n={p['n']}, no interval)"
    return (f"{format(p['diff'], '+' + fmt)} [{format(p['lo'], '+' + fmt)}, {format(p['hi'], '+' + fmt)}], "
            f"{p['verdict']} (n={p['n']})")


def paired_records(x: Mapping, ref: Mapping, better: Mapping) -> dict:
    """{metric: paired(...)} for per-seed records {seed: {metric: value}} of an arm and its reference arm,
    `better` naming each metric compared and its good direction ('higher' / 'lower')."""
    return {k: paired({s: r.get(k) for s, r in x.items()}, {s: r.get(k) for s, r in ref.items()}, b)
            for k, b in better.items()}


def md_table(rows: list[dict]) -> str:
    """The markdown table of every report: rows {header: cell} (cells formatted), the first row's headers.
    Unpadded (not DataFrame.to_markdown's aligned columns): a committed table.md then changes only where a
    number does."""
    head = list(rows[0]) if rows else ["(no rows)"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows])

"""The one place for the statistics of the benchmarks: the mean with its 95% confidence interval over seeds,
paired differences (same seed), the bootstrap interval of a median over rounds, and the two verdicts.

- bench/accuracy.py: test accuracy over seeds -> mean_ci; a method against another with the same seeds ->
  paired; a cheaper method against the exact method it approximates -> cheaper_verdict.
- bench/report.py: per-round step-time ratios -> estimate (median, bootstrap 95% interval); a target on that
  interval -> target_verdict.
No torch here: bench/plots.py uses it with matplotlib only.
"""

import math
import random
import statistics

# Student t, two-sided 95%, by degrees of freedom
T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
}
KEEPS_ABOVE = -1.0  # cheaper_verdict: "keeps" needs the paired difference's mean above -1 point


def mean_ci(values):
    """-> (mean, half-width of the 95% confidence interval of the mean, t * sd / sqrt(n); nan for one)."""
    n = len(values)
    if n - 1 > max(T975):
        raise ValueError(f"mean_ci: {n} values; the t table (lab/stats.py T975) goes up to {max(T975) + 1}")
    m = statistics.mean(values)
    return m, (T975[n - 1] * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan"))


def paired(a, b):
    """a, b: {seed: value}. -> (mean, 95% CI half-width, n) of a[s] - b[s] over the seeds both have, or
    None when they share none. Same seed = same initialization and data order: its noise cancels."""
    diffs = [a[s] - b[s] for s in sorted(a) if s in b]
    return mean_ci(diffs) + (len(diffs),) if diffs else None


def cheaper_verdict(delta, keeps_above=KEEPS_ABOVE):
    """The decision rule for a cheaper method, on its paired difference delta = (mean, ci, n) to the exact
    method it approximates: 'keeps' when the 95% CI includes 0 and the mean is above keeps_above (-1
    point), 'gains' when the whole CI is above 0, 'loses' when the whole CI is below 0, otherwise
    'undecided'. None without a CI (no delta, or a single paired seed)."""
    if delta is None or delta[2] < 2:
        return None
    m, h = delta[:2]
    if m - h <= 0 <= m + h and m > keeps_above:
        return "keeps"
    return "loses" if m + h < 0 else "gains" if m - h > 0 else "undecided"


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def interval(samples, stat=median, n=2000, seed=0):
    """Bootstrap 95% interval of stat(*samples), each list of `samples` resampled with replacement alone."""
    rng = random.Random(seed)
    draws = sorted(stat(*[rng.choices(s, k=len(s)) for s in samples]) for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def estimate(values):
    """(median, low, high) of per-round values: the median and its bootstrap 95% interval."""
    return (median(values), *interval([values]))


def target_verdict(lo, hi, limit, at_most=True):
    """A target on a 95% interval [lo, hi]: 'PASS' when the whole interval meets it (<= limit, or >= limit
    with at_most=False), 'MISS' when the whole interval misses it, 'UNDECIDED' when it straddles the limit."""
    if at_most:
        return "PASS" if hi <= limit else "MISS" if lo > limit else "UNDECIDED"
    return "PASS" if lo >= limit else "MISS" if hi < limit else "UNDECIDED"

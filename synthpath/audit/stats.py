"""The audit's statistical tests: exact binomial tests and Clopper-Pearson intervals."""

from __future__ import annotations


def binomial_excess(k: int, n: int, p0: float, alpha: float) -> dict:
    """One-sided exact binomial test of H0 "the rate is at most ``p0``" against "it is
    higher", for ``k`` events in ``n`` trials, with the exact (Clopper-Pearson) two-sided
    ``1 - alpha`` interval of the rate, its one-sided ``1 - alpha`` lower bound, and the
    smallest count that would reject at ``alpha``."""
    from scipy.stats import binom, binomtest

    if n <= 0:
        return {"k": int(k), "n": 0, "p0": float(p0), "p_value": 1.0, "interval": [0.0, 1.0], "lower_bound": 0.0,
                "reject": False, "critical_count": None, "alpha": float(alpha)}
    p0 = min(max(float(p0), 0.0), 1.0)
    res = binomtest(int(k), int(n), p0, alternative="greater")
    ci = binomtest(int(k), int(n), p0).proportion_ci(confidence_level=1 - alpha, method="exact")
    lower = binomtest(int(k), int(n), p0, alternative="greater").proportion_ci(confidence_level=1 - alpha,
                                                                             method="exact").low
    # smallest c with P(X >= c | n, p0) < alpha
    crit = next((c for c in range(int(n) + 1) if binom.sf(c - 1, int(n), p0) < alpha), None)
    return {"k": int(k), "n": int(n), "p0": p0, "p_value": float(res.pvalue), "interval": [float(ci.low), float(ci.high)],
            "lower_bound": float(lower), "reject": bool(res.pvalue < alpha), "critical_count": crit,
            "alpha": float(alpha)}

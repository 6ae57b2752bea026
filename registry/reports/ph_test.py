"""The proportional-hazards check of a fitted Cox model. PURE: numpy and scipy only.

Scaled Schoenfeld residuals (Efron ties) computed vectorised, the Grambsch–Therneau test with
the rank of time (Grambsch & Therneau, Biometrika 1994;81:515–526), and the binned residuals
the report plots. lifelines computes the same residuals in a per-row Python loop, which takes
minutes at 100,000 patients; tests check the two agree on untied times.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

SCHOENFELD_BINS = 20


def scaled_schoenfeld(x: np.ndarray, t: np.ndarray, e: np.ndarray, beta: np.ndarray,
                      variance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Event times (ascending) and the scaled Schoenfeld residuals ``d · r_k · Var(β)`` of a
    fitted Cox model (Efron ties), as lifelines' ``compute_residuals(..., "scaled_schoenfeld")``
    (without β added) but vectorised: lifelines loops over rows in Python, which takes minutes
    at 100,000 patients. ``r_k = x_k − x̄(t_k)``, where x̄(t) is the Efron-weighted mean of x
    over the risk set at t: (1/m) Σ_{l<m} (S1 − l/m·D1) / (S0 − l/m·D0), S over the risk set,
    D over the m events at t."""
    order = np.argsort(t, kind="mergesort")
    t, e, x = t[order], e[order], x[order]
    phi = np.exp(x @ beta)
    s0 = np.cumsum(phi[::-1])[::-1]
    s1 = np.cumsum((phi[:, None] * x)[::-1], axis=0)[::-1]
    times, first, group = np.unique(t, return_index=True, return_inverse=True)
    m = np.bincount(group, weights=e.astype(float), minlength=len(times))
    d0 = np.bincount(group, weights=phi * e, minlength=len(times))
    d1 = np.stack([np.bincount(group, weights=phi * x[:, j] * e, minlength=len(times))
                   for j in range(x.shape[1])], axis=1)
    risk0, risk1 = s0[first], s1[first]
    has = m > 0
    mean = np.zeros_like(risk1)
    for level in range(int(m.max()) if has.any() else 0):
        rows = m > level
        share = level / m[rows]
        mean[rows] += (risk1[rows] - share[:, None] * d1[rows]) / (
            risk0[rows] - share * d0[rows])[:, None]
    mean[has] /= m[has][:, None]
    residuals = x[e] - mean[group[e]]
    return t[e], float(e.sum()) * residuals @ variance


def ph_test_rank(event_times: np.ndarray, scaled: np.ndarray,
                 standard_errors: np.ndarray) -> list[float]:
    """Grambsch–Therneau test per covariate with the rank of the event time (mid-ranks for
    tied times, as R's ``cox.zph(transform = "rank")``): T = (Σ (g − ḡ) r*)² / (d · se² ·
    Σ (g − ḡ)²), χ² with 1 df (lifelines' statistic). Returns the p-values."""
    g = stats.rankdata(event_times)
    g = g - g.mean()
    denominator = len(g) * standard_errors**2 * float((g**2).sum())
    statistic = (g[:, None] * scaled).sum(axis=0) ** 2 / denominator
    return [float(p) for p in stats.chi2.sf(statistic, 1)]


def schoenfeld_bins(times: np.ndarray, values: np.ndarray, term: str,
                     beta: float) -> dict[str, Any]:
    """β + scaled Schoenfeld residuals of ``term`` (R's convention: an estimate of β(t))
    against event time, for the plot: the mean in ``SCHOENFELD_BINS`` bins of equal event
    count (with each bin's event count), plus up to 500 points of a seeded sample for the
    identified view. Under proportional hazards the binned means scatter around β."""
    bins = []
    for chunk in np.array_split(np.arange(len(times)), min(SCHOENFELD_BINS, len(times))):
        if len(chunk):
            bins.append({"time_days": float(np.median(times[chunk])),
                         "mean": float(values[chunk].mean()), "events": len(chunk)})
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(times), size=min(500, len(times)), replace=False))
    return {"term": term, "log_hr": beta, "bins": bins,
            "points_time_days": times[pick].tolist(), "points": values[pick].tolist()}

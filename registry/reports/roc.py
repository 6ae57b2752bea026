"""The QI report's discrimination sections: ROC of VBQ for a secondary fracture within
``ROC_HORIZON_DAYS`` (AUC with the DeLong 95 % CI, Youden threshold, confusion at the configured
threshold) and the cumulative/dynamic AUC at 1 and 2 years with IPCW weights. PURE: no Django
import (methods and references: ``registry.reports.survival`` and docs/reports.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from registry.reports.cohort import (
    ROC_HORIZON_DAYS,
    TIME_DEPENDENT_AUC_DAYS,
    CohortRow,
    ReportParams,
    Section,
    vbq_of,
)


# --- ROC --------------------------------------------------------------------------------------
def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = len(x)
    ranks_sorted = np.empty(n, dtype=float)
    i = 0
    while i < n:
        j = i
        while j < n and sorted_x[j] == sorted_x[i]:
            j += 1
        ranks_sorted[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    ranks = np.empty(n, dtype=float)
    ranks[order] = ranks_sorted
    return ranks


def delong_auc_ci(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """AUC, its DeLong standard error and 95 % CI (Sun & Xu 2014 fast algorithm)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=bool)
    pos, neg = scores[labels], scores[~labels]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError("ROC needs both patients with and without a secondary fracture")
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() / m - (m + 1) / 2) / n
    v01 = (tz[:m] - tx) / n
    v10 = 1.0 - (tz[m:] - ty) / m
    s01 = np.var(v01, ddof=1) if m > 1 else 0.0
    s10 = np.var(v10, ddof=1) if n > 1 else 0.0
    se = math.sqrt(s01 / m + s10 / n)
    return float(auc), se, max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)


def _confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    pred = scores >= threshold
    tp = int((pred & labels).sum())
    fp = int((pred & ~labels).sum())
    fn = int((~pred & labels).sum())
    tn = int((~pred & ~labels).sum())

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "threshold": threshold, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
    }


def roc(rows: Sequence[CohortRow], params: ReportParams) -> Section:
    """ROC of VBQ for a secondary fracture within ``ROC_HORIZON_DAYS``, on the patients whose
    status at the horizon is known: a fracture within it (case) or fracture-free follow-up
    reaching it (control). Patients censored earlier are left out (counted), never taken for
    non-fractured. Plus the IPCW cumulative/dynamic AUC at 1 and 2 years on every patient."""
    from sklearn.metrics import roc_curve

    usable = [r for r in rows if vbq_of(r, params) is not None]
    if len(usable) == 0:
        return Section(False, "No patients with a VBQ value: no ROC.")
    horizon = ROC_HORIZON_DAYS
    known = [r for r in usable if (r.event and r.time_days <= horizon) or r.time_days >= horizon]
    scores = np.array([vbq_of(r, params) for r in known], dtype=float)
    labels = np.array([r.event and r.time_days <= horizon for r in known], dtype=bool)
    excluded = len(usable) - len(known)
    restriction = (
        f"Cases: secondary fracture within {horizon} days; controls: followed "
        f"fracture-free for {horizon} days. Patients censored earlier without a fracture "
        "are left out of this ROC (their number: excluded_short_followup)."
    )
    data: dict[str, Any] = {"horizon_days": horizon, "n": len(known),
                            "excluded_short_followup": excluded, "time_dependent": {}}
    data["time_dependent"] = _time_dependent_auc(usable, params)
    if not known or labels.all() or not labels.any():
        return Section(False, "ROC needs patients both with a secondary fracture within "
                       f"{horizon} days and followed fracture-free for {horizon} days. "
                       + restriction, data)
    auc, se, lo, hi = delong_auc_ci(scores, labels)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    youden_idx = int(np.argmax(tpr - fpr))
    data.update({
        "auc": auc, "se": se, "ci95": [lo, hi], "method": "DeLong",
        "fpr": fpr.tolist(), "tpr": tpr.tolist(),
        "youden_threshold": float(thresholds[youden_idx]),
        "youden_j": float(tpr[youden_idx] - fpr[youden_idx]),
        "at_threshold": _confusion(scores, labels, params.threshold),
        "cases": int(labels.sum()), "controls": int((~labels).sum()),
    })
    return Section(True, restriction, data)


def _time_dependent_auc(rows: Sequence[CohortRow], params: ReportParams) -> dict[str, Any]:
    """Cumulative/dynamic AUC at ``TIME_DEPENDENT_AUC_DAYS`` with inverse-probability-of-
    censoring weights (Uno et al. 2007; scikit-survival): cases = fracture by t, weighted by
    1 / G(T_i) with G the Kaplan–Meier estimate of the censoring distribution; controls =
    fracture-free beyond t. A horizon outside the follow-up, or with no case or no control,
    is reported with the reason instead of a value."""
    from sksurv.metrics import cumulative_dynamic_auc
    from sksurv.util import Surv

    out: dict[str, Any] = {}
    if not rows:
        return out
    times = np.array([r.time_days for r in rows], dtype=float)
    events = np.array([r.event for r in rows], dtype=bool)
    scores = np.array([vbq_of(r, params) for r in rows], dtype=float)
    y = Surv.from_arrays(event=events, time=times)
    for horizon in TIME_DEPENDENT_AUC_DAYS:
        cases = int((events & (times <= horizon)).sum())
        controls = int((times > horizon).sum())
        entry: dict[str, Any] = {"cases": cases, "controls": controls, "method": "IPCW (Uno)"}
        if cases == 0 or controls == 0:
            entry["auc"] = None
            entry["message"] = "no case or no control at this horizon"
        else:
            try:
                auc, _ = cumulative_dynamic_auc(y, y, scores, [float(horizon)])
                entry["auc"] = float(auc[0])
            except ValueError as exc:
                entry["auc"] = None
                entry["message"] = str(exc)
        out[str(horizon)] = entry
    return out

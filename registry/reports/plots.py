"""Report figures (matplotlib, Agg backend). Pure: take ``Section``s, return SVG/PNG bytes.

An unavailable section renders a placeholder figure carrying its message, so a page never shows
a broken image. Text stays text in SVG (readable, searchable, accessible). Every drawer takes
``deidentified`` and ``small_cell_min``: for the de-identified role a count from 1 to
``small_cell_min - 1`` is never drawn — numbers at risk and legend counts print as
"<5", and the histogram's bins are coarsened until none holds such a count (a bin that still
does is drawn empty and labelled "<5") — as the page says.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from registry.reports.cohort import (
    AT_RISK_TIMES_DAYS,
    DAYS_PER_MONTH,
    HIGH,
    NORMAL,
    Section,
    format_p,
)

matplotlib.rcParams["svg.fonttype"] = "none"
HISTOGRAM_BIN_DAYS = 90

COLORS = {HIGH: "#b42318", NORMAL: "#0b5cad"}
LABELS = {HIGH: "VBQ high (≥ threshold)", NORMAL: "VBQ normal"}


def _render(fig: Any, fmt: str) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, bbox_inches="tight", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _placeholder(message: str, fmt: str, synthetic: bool) -> bytes:
    fig, ax = plt.subplots(figsize=(6.4, 2.2))
    ax.axis("off")
    ax.text(0.5, 0.5, message or "Not available", ha="center", va="center", wrap=True)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def _watermark(fig: Any, synthetic: bool) -> None:
    if synthetic:
        fig.text(0.99, 0.01, "SYNTHETIC DATA", ha="right", va="bottom", color="#9a3412",
                 fontsize=9, fontweight="bold")


def shown_count(count: int | None, deidentified: bool, small_cell_min: int) -> str:
    """A count as a figure may print it: "<5" for 1..small_cell_min-1 when de-identified."""
    if count is None:
        return "—"
    if deidentified and 0 < count < small_cell_min:
        return f"<{small_cell_min}"
    return str(count)


def km_plot(section: Section, fmt: str = "svg", synthetic: bool = False, *,
            deidentified: bool = False, small_cell_min: int = 5) -> bytes:
    """Kaplan–Meier curves (fracture-free survival) by VBQ group with CI bands, and the number
    at risk under the x-axis ticks it belongs to (days since the index procedure)."""
    if not section.available:
        return _placeholder(section.message, fmt, synthetic)
    curves = section.data["curves"]
    fig, (ax, ax_table) = plt.subplots(
        2, 1, figsize=(7, 5.4), gridspec_kw={"height_ratios": [4, 1]}, sharex=True
    )
    for group, curve in curves.items():
        n = shown_count(curve["n"], deidentified, small_cell_min)
        events = shown_count(curve["events"], deidentified, small_cell_min)
        ax.step(curve["time_days"], curve["survival"], where="post", color=COLORS[group],
                label=f"{LABELS[group]} (n={n}, events={events})")
        ax.fill_between(curve["time_days"], curve["ci_lower"], curve["ci_upper"], step="post",
                        color=COLORS[group], alpha=0.15)
    ax.set_ylabel("Free of secondary fracture")
    ax.set_ylim(0, 1.02)
    title = "Kaplan–Meier by VBQ group"
    if "logrank" in section.data:
        p = format_p(section.data["logrank"]["p"])
        title += f" (log-rank p {p if p.startswith('<') else '= ' + p})"
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    last = max([max(c["time_days"], default=0.0) for c in curves.values()] + [1.0])
    ticks = [t for t in AT_RISK_TIMES_DAYS if t <= max(last, AT_RISK_TIMES_DAYS[1])]
    ax.set_xlim(0, max(last, ticks[-1]) * 1.02)
    # The at-risk numbers sit under these ticks; the tick labels are drawn on both panels
    # (sharex would hide them on the upper one).
    for axis in (ax, ax_table):
        axis.set_xticks(ticks)
        axis.tick_params(axis="x", labelbottom=True, labelsize=8)
    for side in ("left", "right", "top"):
        ax_table.spines[side].set_visible(False)
    ax_table.set_yticks([])
    ax_table.set_ylim(0, 1)
    for row, (group, curve) in enumerate(curves.items()):
        ax_table.text(-0.02, 0.7 - 0.45 * row, group, transform=ax_table.transAxes, ha="right",
                      color=COLORS[group], fontsize=8)
        for tp in ticks:
            ax_table.text(tp, 0.7 - 0.45 * row,
                          shown_count(curve["at_risk"][str(tp)], deidentified, small_cell_min),
                          ha="center", fontsize=8, transform=ax_table.get_xaxis_transform())
    ax_table.set_title("Number at risk", fontsize=8, loc="left")
    ax_table.set_xlabel("Days since index procedure "
                        f"(365 days = 1 year = {365 / DAYS_PER_MONTH:.0f} months)")
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def roc_plot(section: Section, fmt: str = "svg", synthetic: bool = False, *,
             deidentified: bool = False, small_cell_min: int = 5) -> bytes:
    if not section.available:
        return _placeholder(section.message, fmt, synthetic)
    d = section.data
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot(d["fpr"], d["tpr"], color=COLORS[HIGH],
            label=f"AUC {d['auc']:.2f} (95% CI {d['ci95'][0]:.2f}–{d['ci95'][1]:.2f})")
    ax.plot([0, 1], [0, 1], color="#888", linestyle="--", linewidth=1)
    at = d["at_threshold"]
    if at["sensitivity"] is not None and at["specificity"] is not None:
        ax.scatter([1 - at["specificity"]], [at["sensitivity"]], color="black", zorder=3,
                   label=f"VBQ ≥ {at['threshold']:.1f}")
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"ROC of VBQ for a secondary fracture within {d['horizon_days']} days\n"
                 f"(cases {shown_count(d['cases'], deidentified, small_cell_min)}, controls "
                 f"{shown_count(d['controls'], deidentified, small_cell_min)}; patients "
                 "censored earlier left out)", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def days_histogram(section: Section, fmt: str = "svg", synthetic: bool = False, *,
                   deidentified: bool = False, small_cell_min: int = 5) -> bytes:
    """Days from the index procedure to the secondary fracture, in bins of
    ``HISTOGRAM_BIN_DAYS``. De-identified, the bins are coarsened (90, then 180, then 365
    days) until none holds 1..small_cell_min-1 fractures; a bin that still does is drawn
    empty and labelled "<5"."""
    days = section.data.get("days_to_fracture", []) if section.available else []
    if not days:
        return _placeholder(section.message or "No secondary fractures.", fmt, synthetic)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for width in (HISTOGRAM_BIN_DAYS, 180, 365) if deidentified else (HISTOGRAM_BIN_DAYS,):
        edges = np.arange(0, max(days) + width + 1, width)
        counts, _ = np.histogram(days, bins=edges)
        small = deidentified & (counts > 0) & (counts < small_cell_min)
        if not small.any():
            break
    heights = np.where(small, 0, counts)
    ax.bar(edges[:-1], heights, width=width, align="edge", color="#0b5cad",
           alpha=0.8, edgecolor="white")
    ax.set_ylim(bottom=0, top=max(1, int(heights.max())) * 1.15)
    ax.yaxis.get_major_locator().set_params(integer=True)
    for left, hidden in zip(edges[:-1], small, strict=True):
        if hidden:
            ax.text(left + width / 2, 0, f"<{small_cell_min}", ha="center",
                    va="bottom", fontsize=7, color="#9a3412")
    if deidentified and small.any():
        ax.set_title(f"Bins with 1–{small_cell_min - 1} fractures are suppressed (\"<"
                     f"{small_cell_min}\")", fontsize=8)
    cutoff = section.data.get("followup_days", 60)
    ax.axvline(cutoff, color="#b42318", linestyle="--", label=f"day {cutoff}")
    ax.set_xlabel(f"Days from index procedure to secondary fracture ({width}-day bins)")
    ax.set_ylabel("Patients")
    ax.legend(fontsize=8)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def bland_altman_plot(section: Section, fmt: str = "svg", synthetic: bool = False, *,
                      deidentified: bool = False, small_cell_min: int = 5) -> bytes:
    if not section.available or "bland_altman" not in section.data:
        return _placeholder(section.message or "No paired VBQ values.", fmt, synthetic)
    ba = section.data["bland_altman"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.scatter(ba["means"], ba["differences"], s=12, color="#0b5cad", alpha=0.7)
    ax.axhline(ba["bias"], color="black", label=f"bias {ba['bias']:.3f}")
    for limit in ba["loa"]:
        ax.axhline(limit, color="#b42318", linestyle="--")
    ax.set_xlabel("Mean of VBQ (all levels, excluding fractured)")
    ax.set_ylabel("All levels − excluding fractured")
    ax.set_title("Bland–Altman: VBQ with vs without fractured level")
    ax.legend(fontsize=8)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def schoenfeld_plot(section: Section, fmt: str = "svg", synthetic: bool = False, *,
                    deidentified: bool = False, small_cell_min: int = 5) -> bytes:
    """Scaled Schoenfeld residuals of the VBQ term (group model, else continuous) against
    time: binned means (and, identified, a sample of the residuals). A trend away from the
    flat log(HR) line is what the proportional-hazards test detects."""
    models = section.data.get("models", {}) if section.available else {}
    model = models.get("group_unadjusted") or models.get("continuous_unadjusted")
    if not model or "schoenfeld" not in model:
        return _placeholder(section.message or "No Cox model.", fmt, synthetic)
    sch = model["schoenfeld"]
    term = sch["term"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if not deidentified and sch.get("points"):
        ax.scatter(sch["points_time_days"], sch["points"], s=6, color="#888", alpha=0.4,
                   label="residuals (sample)")
    bins = [b for b in sch["bins"] if not deidentified or b["events"] >= small_cell_min]
    ax.plot([b["time_days"] for b in bins], [b["mean"] for b in bins], "o-",
            color="#b42318", label="mean per bin of events")
    if sch.get("log_hr") is not None:
        ax.axhline(sch["log_hr"], color="black", linestyle="--", linewidth=1,
                   label="log(HR): flat under proportional hazards")
    p = format_p(model["ph_test"].get(term))
    verdict = model["ph_verdict"].get(term, "")
    ax.set_title(f"Scaled Schoenfeld residuals, {term}: PH {verdict} "
                 f"(p {p if p.startswith('<') else '= ' + p}, n = {model['ph_test_n']})",
                 fontsize=9)
    ax.set_xlabel("Days since index procedure (event times)")
    ax.set_ylabel("Scaled Schoenfeld residual")
    ax.legend(fontsize=7)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


PLOTS = {
    "km": ("kaplan_meier", km_plot),
    "schoenfeld": ("cox", schoenfeld_plot),
    "roc": ("roc", roc_plot),
    "days": ("incidence", days_histogram),
    "bland-altman": ("paired_vbq", bland_altman_plot),
}

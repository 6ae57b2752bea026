"""Report figures (matplotlib, Agg backend). Pure: take ``Section``s, return SVG/PNG bytes.

An unavailable section renders a placeholder figure carrying its message, so a page never shows
a broken image.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from registry.reports.survival import AT_RISK_TIMES_DAYS, HIGH, NORMAL, Section

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


def km_plot(section: Section, fmt: str = "svg", synthetic: bool = False) -> bytes:
    """Kaplan–Meier curves (fracture-free survival) by VBQ group with CI bands and at-risk table."""
    if not section.available:
        return _placeholder(section.message, fmt, synthetic)
    curves = section.data["curves"]
    fig, (ax, ax_table) = plt.subplots(
        2, 1, figsize=(7, 5.2), gridspec_kw={"height_ratios": [4, 1]}, sharex=True
    )
    for group, curve in curves.items():
        ax.step(curve["time_days"], curve["survival"], where="post", color=COLORS[group],
                label=f"{LABELS[group]} (n={curve['n']}, events={curve['events']})")
        ax.fill_between(curve["time_days"], curve["ci_lower"], curve["ci_upper"], step="post",
                        color=COLORS[group], alpha=0.15)
    ax.set_ylabel("Free of secondary fracture")
    ax.set_ylim(0, 1.02)
    title = "Kaplan–Meier by VBQ group"
    if "logrank" in section.data:
        title += f" (log-rank p = {section.data['logrank']['p']:.3f})"
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_table.axis("off")
    for row, (group, curve) in enumerate(curves.items()):
        ax_table.text(-0.02, 0.7 - 0.45 * row, group, transform=ax_table.transAxes, ha="right",
                      color=COLORS[group], fontsize=8)
        for tp in AT_RISK_TIMES_DAYS:
            ax_table.text(tp, 0.7 - 0.45 * row, str(curve["at_risk"][str(tp)]), ha="center",
                          fontsize=8, transform=ax_table.get_xaxis_transform())
    ax_table.set_title("Number at risk", fontsize=8, loc="left")
    ax_table.set_xlabel("Days since index procedure")
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def roc_plot(section: Section, fmt: str = "svg", synthetic: bool = False) -> bytes:
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
    ax.set_title("ROC of VBQ for secondary fracture")
    ax.legend(loc="lower right", fontsize=8)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def days_histogram(section: Section, fmt: str = "svg", synthetic: bool = False) -> bytes:
    days = section.data.get("days_to_fracture", []) if section.available else []
    if not days:
        return _placeholder(section.message or "No secondary fractures.", fmt, synthetic)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(days, bins=min(20, max(5, len(days) // 2)), color="#0b5cad", alpha=0.8)
    cutoff = section.data.get("followup_days", 60)
    ax.axvline(cutoff, color="#b42318", linestyle="--", label=f"day {cutoff}")
    ax.set_xlabel("Days from index procedure to secondary fracture")
    ax.set_ylabel("Patients")
    ax.legend(fontsize=8)
    _watermark(fig, synthetic)
    return _render(fig, fmt)


def bland_altman_plot(section: Section, fmt: str = "svg", synthetic: bool = False) -> bytes:
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


PLOTS = {
    "km": ("kaplan_meier", km_plot),
    "roc": ("roc", roc_plot),
    "days": ("incidence", days_histogram),
    "bland-altman": ("paired_vbq", bland_altman_plot),
}

"""Explainability: a PNG of the measured slice with the ROIs, level labels and VBQ. Pure (Pillow).

``render_png(series, measurement, path)`` draws every body ROI (yellow; red when the level is
fractured or suggested fractured), the CSF ROI (cyan), each level's name beside its ROI, and a
header with the VBQ values, status, confidence and algorithm version. The image is windowed
from its own 1st–99.5th percentiles and scaled to at least 512 pixels high.

Text is drawn with DejaVu Sans (shipped inside matplotlib, a pinned requirement), which has
every character the overlay writes ("—" for a missing value included); Pillow's built-in
font lacks such glyphs and draws boxes. Where the DejaVu file cannot be found the text falls
back to Pillow's font and plain ASCII (``ascii_text``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from scoring.engine.dicom_io import Series
from scoring.engine.model import Roi, VbqMeasurement


def roi_outline(roi: Roi, points: int = 48) -> list[tuple[float, float]]:
    """The ROI's outline as (x=col, y=row) pixel points."""
    a = np.radians(roi.angle_deg)
    axis = np.array([np.cos(a), np.sin(a)])  # (row, col) direction of the height axis
    normal = np.array([-np.sin(a), np.cos(a)])
    if roi.shape == "box":
        corners = [(1, 1), (1, -1), (-1, -1), (-1, 1)]
        pts = [np.array([roi.row, roi.col]) + u * roi.half_height * axis
               + v * roi.half_width * normal for u, v in corners]
    else:
        t = np.linspace(0, 2 * np.pi, points, endpoint=False)
        pts = [np.array([roi.row, roi.col]) + np.cos(x) * roi.half_height * axis
               + np.sin(x) * roi.half_width * normal for x in t]
    return [(float(p[1]), float(p[0])) for p in pts]


FONT_SIZE = 12
MISSING = "—"


def overlay_font(size: int = FONT_SIZE) -> tuple[ImageFont.FreeTypeFont | ImageFont.ImageFont,
                                                  bool]:
    """(font, has_unicode): DejaVu Sans from matplotlib's data folder, else Pillow's built-in
    font (then only ASCII is written)."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size), True
    except (ImportError, OSError):
        return ImageFont.load_default(size), False


def ascii_text(text: str) -> str:
    """``text`` with the overlay's few non-ASCII characters spelled in ASCII."""
    for uni, plain in ((MISSING, "-"), ("–", "-"), ("±", "+/-"), ("≥", ">="), ("≤", "<=")):
        text = text.replace(uni, plain)
    return text.encode("ascii", "replace").decode("ascii")


def render_png(series: Series, result: VbqMeasurement, path: str | Path) -> Path:
    """Write the overlay PNG; returns its path."""
    rois = [m.roi for m in result.levels.values()]
    if result.csf is not None:
        rois.append(result.csf.roi)
    slice_index = rois[0].slice_index if rois else series.pixels.shape[0] // 2
    image = series.pixels[slice_index].astype(float)
    lo, hi = np.percentile(image, [1, 99.5])
    grey = np.clip((image - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    scale = max(1, int(np.ceil(512 / grey.shape[0])))
    header = 40
    canvas = Image.new("RGB", (grey.shape[1] * scale, grey.shape[0] * scale + header))
    canvas.paste(Image.fromarray(grey).convert("RGB").resize(
        (grey.shape[1] * scale, grey.shape[0] * scale), Image.Resampling.BILINEAR), (0, header))
    draw = ImageDraw.Draw(canvas)
    font, has_unicode = overlay_font()

    def text(at: tuple[float, float], value: str, colour: tuple[int, int, int]) -> None:
        draw.text(at, value if has_unicode else ascii_text(value), fill=colour, font=font)

    def xy(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        return [((x + 0.5) * scale, (y + 0.5) * scale + header) for x, y in points]

    for level, m in result.levels.items():
        colour = (255, 80, 80) if m.fractured or m.suggested_fractured else (255, 220, 0)
        outline = xy(roi_outline(m.roi))
        draw.polygon(outline, outline=colour, width=2)
        x = min(p[0] for p in outline) - 34
        y = sum(p[1] for p in outline) / len(outline) - 6
        text((max(0, x), y), level + ("*" if m.suggested_fractured else ""), colour)
    if result.csf is not None:
        draw.polygon(xy(roi_outline(result.csf.roi)), outline=(0, 220, 255), width=2)
    vbq = MISSING if result.vbq_all_levels is None else f"{result.vbq_all_levels:.2f}"
    excl = (MISSING if result.vbq_excluding_fractured is None
            else f"{result.vbq_excluding_fractured:.2f}")
    text((6, 4), f"VBQ {vbq} (excluding fractured {excl})   status {result.status}   "
         f"confidence {result.confidence:.2f}", (255, 255, 255))
    text((6, 20), f"slice {slice_index + 1}/{series.pixels.shape[0]}   source "
         f"{result.source}   engine {result.algorithm_version}   "
         f"{result.acquisition.series_description[:40]}", (200, 200, 200))
    out = Path(path)
    canvas.save(out, format="PNG")
    return out

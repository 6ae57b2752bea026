"""QC of placed ROIs (manual and assisted paths): the checks the automatic path makes on its
own ROIs, applied to ROIs a person placed, so a hand-placed ROI is never trusted blindly.
PURE (numpy).

Checks, each a ``QcFlag`` of severity ``warning`` and a confidence penalty:

- ROI size: a CSF ROI of fewer than ``MIN_CSF_PIXELS`` pixels (as the automatic path);
- contrast: marrow (median of the L1–L4 medians) not at least 1.1 × the CSF, as on a T1 image
  (as the automatic path);
- position inside the canal: the CSF ROI is not uniform (interquartile range above
  ``CSF_MAX_SPREAD`` of its median: part of it lies on the cord, the dura, fat or bone), it is
  not behind the L3 body (patient coordinates: posterior), or not at the height of L3 (between
  the midpoints to L2 and L4, else within ``CSF_L3_REACH_MM`` of L3);
- position inside the body: an L1–L4 ROI that is not uniform (interquartile range above
  ``BODY_MAX_SPREAD`` of its median: it straddles a disc, an endplate or the edge of the
  body), and levels that are not in order from head to feet;
- signal voids (cement, hardware) are checked by the caller (``vbq``), as for
  the automatic path.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise

import numpy as np

from scoring.engine.dicom_io import Series
from scoring.engine.model import VBQ_LEVELS, LevelMeasurement, QcFlag
from scoring.engine.rois import roi_values

MIN_CSF_PIXELS = 40
CSF_MAX_SPREAD = 0.2
BODY_MAX_SPREAD = 0.3
CSF_L3_REACH_MM = 20.0


def _spread(series: Series, m: LevelMeasurement) -> float:
    values = roi_values(series.pixels[m.roi.slice_index], m.roi)
    if values.size == 0 or m.median_si <= 0:
        return 0.0
    q1, q3 = np.percentile(values, [25, 75])
    return float(q3 - q1) / m.median_si


def placed_roi_qc(series: Series, levels: Mapping[str, LevelMeasurement],
                  csf: LevelMeasurement) -> tuple[list[QcFlag], float]:
    """QC flags for placed ROIs and the confidence penalty they carry (0 when clean)."""
    flags: list[QcFlag] = []
    penalty = 0.0
    if csf.pixel_count < MIN_CSF_PIXELS:
        flags.append(QcFlag("small-csf-roi", f"the CSF ROI holds {csf.pixel_count} pixels "
                            f"(at least {MIN_CSF_PIXELS} expected): draw it larger"))
        penalty += 0.2
    marrow = [levels[lv].median_si for lv in VBQ_LEVELS if lv in levels]
    if marrow and csf.median_si > 0 and float(np.median(marrow)) < 1.1 * csf.median_si:
        flags.append(QcFlag("weak-marrow-contrast", "marrow is not brighter than CSF as on a "
                            "T1 image: check the series and the ROIs"))
        penalty += 0.5
    spread = _spread(series, csf)
    if spread > CSF_MAX_SPREAD:
        flags.append(QcFlag("csf-roi-not-uniform", f"the CSF ROI is not uniform (spread "
                            f"{spread:.0%} of its median): part of it may lie outside the "
                            "canal (cord, dura, fat or bone)"))
        penalty += 0.3
    uneven = [lv for lv in VBQ_LEVELS if lv in levels
              and _spread(series, levels[lv]) > BODY_MAX_SPREAD]
    if uneven:
        flags.append(QcFlag("body-roi-not-uniform", f"{', '.join(uneven)}: the ROI is not "
                            "uniform: it may cross a disc, an endplate or the edge of the body"))
        penalty += 0.3
    penalty += _position(levels, csf, flags)
    return flags, penalty


def _position(levels: Mapping[str, LevelMeasurement], csf: LevelMeasurement,
              flags: list[QcFlag]) -> float:
    """Order of the levels and the CSF ROI's place behind L3, in patient coordinates (LPS mm:
    +y posterior, +z superior)."""
    penalty = 0.0
    z = {lv: levels[lv].centroid_lps_mm[2] for lv in VBQ_LEVELS if lv in levels}
    order = [lv for lv in VBQ_LEVELS if lv in z]
    if any(z[a] <= z[b] for a, b in pairwise(order)):
        flags.append(QcFlag("levels-out-of-order", "the L1–L4 ROIs are not in order from head "
                            "to feet: check the labels"))
        penalty += 0.3
    l3 = levels.get("L3")
    if l3 is None:
        return penalty
    if csf.centroid_lps_mm[1] <= l3.centroid_lps_mm[1]:
        flags.append(QcFlag("csf-not-behind-l3", "the CSF ROI is not behind the L3 body: it "
                            "should lie in the spinal canal, posterior to L3"))
        penalty += 0.3
    low, high = l3.centroid_lps_mm[2] - CSF_L3_REACH_MM, l3.centroid_lps_mm[2] + CSF_L3_REACH_MM
    if "L2" in z:
        high = (z["L2"] + z["L3"]) / 2
    if "L4" in z:
        low = (z["L3"] + z["L4"]) / 2
    if not low <= csf.centroid_lps_mm[2] <= high:
        flags.append(QcFlag("csf-not-at-l3", "the CSF ROI is not at the height of L3"))
        penalty += 0.2
    return penalty

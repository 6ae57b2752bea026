"""One vertebral body on a sagittal slice: its own axes, its ROI, and the CSF ROI behind it.

Pure (numpy, scipy). Shared by the paths that know a body's mask without the automatic
localiser: an external segmentation (``segimport``) and the one-click assisted path
(``assisted``).

- ``series_directions``: the inferior and posterior directions of a series' slice in
  (row mm, column mm), from ``ImageOrientationPatient`` (DICOM LPS: +z superior, +y posterior).
- ``body_axes``: centre, superior→inferior axis and anterior→posterior normal of a body mask
  (principal axes of its pixels, in millimetres), with its extent along both.
- ``body_roi``: the box the automatic path measures: central 60 % of the height, from 20 % of
  the depth behind the anterior wall to 35 % in front of the posterior wall (anterior cortex
  and the basivertebral vein left out), along the body's own axes.
- ``csf_roi_behind``: the CSF at that level: profiles along the body's normal, starting at its
  posterior wall, through the central 60 % of its height; the thecal sac is the darkest band
  at least ``CSF_MIN_BAND_MM`` wide within ``CSF_SEARCH_MM`` of the wall (CSF is the darkest
  wide structure there on T1; the cortex and ligaments are thinner), its edges where the
  profile rises half-way from that band to the body's marrow (its width is checked). The ROI
  is the band's pure core, where the profile stays within ``CSF_CORE_TOLERANCE`` of its
  darkest level, less ``CSF_WALL_MARGIN_MM`` each side (dura, roots along the posterior wall
  and partial volume are brighter), over the central 60 % of the body's height.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from scoring.engine.dicom_io import Series
from scoring.engine.model import QcFlag, Roi

CSF_SEARCH_MM = 30.0  # how far behind the posterior wall the thecal sac is searched
CSF_MIN_BAND_MM = 3.0  # narrower dark lines (cortex, ligaments) are not the sac
CSF_WALL_MARGIN_MM = 0.5  # inside the pure core (see CSF_CORE_TOLERANCE)
CSF_CORE_TOLERANCE = 0.08  # the core: within 8 % of the darkest level
CSF_MIN_HALF_WIDTH_MM = 1.0
CSF_MIN_WIDTH_MM = 4.0  # a narrower sac is flagged
CSF_MAX_FRACTION_OF_MARROW = 0.85  # a "CSF" band brighter than this is not CSF on T1
STEP_MM = 0.5
BODY_HEIGHT_MM = (10.0, 50.0)  # a lumbar body on a sagittal slice, with margin
BODY_DEPTH_MM = (15.0, 70.0)


@dataclass(frozen=True)
class BodyAxes:
    """A body in (row mm, column mm) of its slice; ``u`` runs along ``axis`` (inferior),
    ``v`` along ``normal`` (posterior), both from ``centre_mm``."""

    centre_mm: np.ndarray
    axis: np.ndarray
    normal: np.ndarray
    u_range: tuple[float, float]
    v_range: tuple[float, float]

    @property
    def height_mm(self) -> float:
        return self.u_range[1] - self.u_range[0]

    @property
    def depth_mm(self) -> float:
        return self.v_range[1] - self.v_range[0]

    @property
    def body_sized(self) -> bool:
        """Whether height and depth are those of a vertebral body (``BODY_*_MM``)."""
        return (BODY_HEIGHT_MM[0] <= self.height_mm <= BODY_HEIGHT_MM[1]
                and BODY_DEPTH_MM[0] <= self.depth_mm <= BODY_DEPTH_MM[1])

    def point(self, u: float | np.ndarray, v: float | np.ndarray) -> np.ndarray:
        """(row mm, column mm) of body coordinates ``u``, ``v`` (broadcast on the last axis)."""
        u_arr, v_arr = np.asarray(u, float), np.asarray(v, float)
        return (self.centre_mm + u_arr[..., None] * self.axis
                + v_arr[..., None] * self.normal)


def series_directions(series: Series) -> tuple[np.ndarray, np.ndarray]:
    """Unit (row mm, column mm) directions of inferior and posterior on the series' slices."""
    row_dir, col_dir = series.orientation[:3], series.orientation[3:]
    # one row down moves along col_dir, one column right along row_dir
    inferior = np.array([-col_dir[2], -row_dir[2]], float)
    posterior = np.array([col_dir[1], row_dir[1]], float)
    if np.linalg.norm(inferior) < 1e-6 or np.linalg.norm(posterior) < 1e-6:
        raise ValueError("the slices do not contain the superior-inferior and the "
                         "anterior-posterior directions")
    return inferior / np.linalg.norm(inferior), posterior / np.linalg.norm(posterior)


def largest_part(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a mask (the body: on a mid-sagittal slice the canal
    separates it from the posterior elements)."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())[1:]
    return np.asarray(labels == int(np.argmax(sizes)) + 1)


def body_axes(mask: np.ndarray, spacing_mm: tuple[float, float], inferior: np.ndarray,
              posterior: np.ndarray) -> BodyAxes | None:
    """Principal axes of a body mask, oriented inferior and posterior; ``None`` when the mask
    holds fewer than 30 pixels."""
    rr, cc = np.nonzero(mask)
    if rr.size < 30:
        return None
    pts = np.stack([rr * spacing_mm[0], cc * spacing_mm[1]], axis=1)
    centre = pts.mean(axis=0)
    _, vecs = np.linalg.eigh(np.cov((pts - centre).T))
    axis = vecs[:, int(np.argmax(np.abs(vecs.T @ inferior)))]
    axis = axis if axis @ inferior >= 0 else -axis
    normal = np.array([-axis[1], axis[0]])
    normal = normal if normal @ posterior >= 0 else -normal
    u = (pts - centre) @ axis
    v = (pts - centre) @ normal
    u_lo, u_hi = np.percentile(u, [1, 99])
    v_lo, v_hi = np.percentile(v, [1, 99])
    return BodyAxes(centre, axis, normal, (float(u_lo), float(u_hi)), (float(v_lo), float(v_hi)))


def _roi(axes: BodyAxes, spacing_mm: tuple[float, float], slice_index: int, u_c: float,
         v_c: float, half_u_mm: float, half_v_mm: float) -> Roi:
    """A box along the body's axes, from body coordinates (mm) to pixels."""
    sp = spacing_mm
    c = axes.point(u_c, v_c)
    angle = float(np.degrees(np.arctan2(axes.axis[1] / sp[1], axes.axis[0] / sp[0])))
    # the ROI's half sizes are in pixels along its own axes: convert through the axis' pixel
    # length (isotropic pixels: simply / spacing)
    px_u = float(np.hypot(axes.axis[0] / sp[0], axes.axis[1] / sp[1]))
    px_v = float(np.hypot(axes.normal[0] / sp[0], axes.normal[1] / sp[1]))
    return Roi(slice_index, float(c[0] / sp[0]), float(c[1] / sp[1]), half_u_mm * px_u,
               half_v_mm * px_v, "box", angle)


def body_roi(axes: BodyAxes, spacing_mm: tuple[float, float], slice_index: int) -> Roi:
    """The measured box of a body (see the module docstring)."""
    u_c = (axes.u_range[0] + axes.u_range[1]) / 2
    v_lo = axes.v_range[0] + 0.2 * axes.depth_mm
    v_hi = axes.v_range[1] - 0.35 * axes.depth_mm
    return _roi(axes, spacing_mm, slice_index, u_c, (v_lo + v_hi) / 2, 0.3 * axes.height_mm,
                (v_hi - v_lo) / 2)


def sample(image: np.ndarray, points_mm: np.ndarray, spacing_mm: tuple[float, float]
           ) -> np.ndarray:
    """Bilinear samples of ``image`` at (row mm, column mm) points (NaN outside)."""
    coords = np.stack([points_mm[..., 0] / spacing_mm[0], points_mm[..., 1] / spacing_mm[1]])
    return np.asarray(ndimage.map_coordinates(image.astype(np.float32, copy=False), coords,
                                              order=1, mode="constant", cval=np.nan))


def _run_below(profile: np.ndarray, start: int, threshold: float) -> tuple[int, int]:
    """First and last index of the run of ``profile`` below ``threshold`` around ``start``."""
    lo = hi = start
    while lo > 0 and profile[lo - 1] < threshold:
        lo -= 1
    while hi < len(profile) - 1 and profile[hi + 1] < threshold:
        hi += 1
    return lo, hi


@dataclass
class CsfFinding:
    roi: Roi | None
    flags: list[QcFlag]
    width_mm: float = 0.0
    darkest: float = float("inf")  # the band's level (closed profile)


def csf_roi_behind(image: np.ndarray, axes: BodyAxes, marrow_si: float,
                   spacing_mm: tuple[float, float], slice_index: int, level: str
                   ) -> CsfFinding:
    """The CSF ROI in the canal just behind a body (see the module docstring). ``roi`` is
    ``None`` with a ``csf-not-found`` flag when no dark band is there."""
    half_h = 0.3 * axes.height_mm
    u_c = (axes.u_range[0] + axes.u_range[1]) / 2
    us = np.arange(u_c - half_h, u_c + half_h + 1e-6, STEP_MM)
    ds = np.arange(0.0, CSF_SEARCH_MM + 1e-6, STEP_MM)
    wall = axes.v_range[1]
    uu, dd = np.meshgrid(us, wall + ds, indexing="ij")
    patch = sample(image, axes.point(uu, dd), spacing_mm)
    with np.errstate(all="ignore"):
        profile = np.nanmedian(patch, axis=0) if np.isfinite(patch).any() else None
    if profile is None or not np.isfinite(profile).all():
        return CsfFinding(None, [QcFlag("csf-not-found", f"the canal behind {level} is outside "
                                        "the image")])
    # a grey closing removes dark lines narrower than the sac (cortex, ligaments) before the
    # darkest point is taken; a 1 mm mean takes the noise out
    box = max(1, round(CSF_MIN_BAND_MM / STEP_MM))
    smooth = ndimage.uniform_filter1d(profile, 3, mode="nearest")
    closed = ndimage.grey_closing(smooth, size=box + 1, mode="nearest")
    i_min = int(np.argmin(closed))
    low = float(closed[i_min])
    if not low < CSF_MAX_FRACTION_OF_MARROW * marrow_si:
        return CsfFinding(None, [QcFlag("csf-not-found", f"no band darker than the marrow "
                                        f"behind {level}: the canal was not found")])
    threshold = low + 0.5 * (marrow_si - low)
    lo, hi = _run_below(closed, i_min, threshold)
    width = float(ds[hi] - ds[lo]) + STEP_MM
    flags: list[QcFlag] = []
    if width < CSF_MIN_WIDTH_MM:
        flags.append(QcFlag("csf-unclear", f"the canal behind {level} is {width:.1f} mm wide "
                            "(narrow or not found): check the CSF ROI"))
    # the ROI: the pure CSF core (within CSF_CORE_TOLERANCE of the darkest level), which
    # leaves out the walls, the dura and the roots lying along the posterior wall
    core = low * (1 + CSF_CORE_TOLERANCE)
    c_lo, c_hi = _run_below(closed, i_min, core)
    d0, d1 = float(ds[c_lo]), float(ds[c_hi])
    half_v = max(CSF_MIN_HALF_WIDTH_MM, (d1 - d0) / 2 - CSF_WALL_MARGIN_MM)
    roi = _roi(axes, spacing_mm, slice_index, u_c, wall + (d0 + d1) / 2, half_h, half_v)
    return CsfFinding(roi, flags, width, low)

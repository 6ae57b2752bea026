"""The real development set (``../shared/mri``): its truth, and the engine scored against it.

Pure (numpy, scipy, pydicom). Read by ``bench/vbq_real.py`` and the real-data regression tests;
nothing of the set is ever copied into the repository. The folder holds (see its README):

- ``siegen/<exam>/``: DICOM series (1 mm isotropic, 8-bit values) and ``truth.npz`` whose
  ``label_level`` (rows, cols, InstanceNumber - 1) labels L1–L5 = 1–5, S1 = 6, T10–T12 = 10–12.
  ``DzZ_T1`` is a T1 TSE with a hand-measured reference VBQ; ``DzZ_T2`` and ``F02`` are T2.
- ``spider_t2/spider_NNN.npz``: 7 sagittal T2 slices (640 × 512, uint8) and a mask with
  1 = vertebra (body and posterior elements, one class for all levels), 2 = disc, 3 = canal;
  no pixel spacing and no level names.

**T2 as development data for a T1 localiser.** Protocol QC refuses T2 series (VBQ is defined on
T1), so the benchmark scores T2 images through ``t1_like``: a fold of the intensities about the
marrow level ``m`` (``m - |x - m|``), which turns the bright CSF and discs of a T2 image darker
than marrow as on T1, keeps muscle below marrow and makes marrow the brightest tissue. ``m`` is
the median intensity under the truth's vertebra masks: one number per image, no position
reaches the engine. Fat also turns dark (on T1 it is bright), so this tests the anatomy, not T1
intensities.

**SPIDER levels** (``spider_levels``): per slice, the vertebral *bodies* are the connected
components of label 1 of at least 80 mm² that lie mostly anterior to the canal (label 3; for
rows below the canal's end, its lowest row's anterior edge); the discs are the components of
label 2 of at least 20 mm². The lowest disc is L5–S1 (the set labels the discs down to the
lumbosacral one; the sacrum itself is often unlabelled): the body directly above it is L5, and
counting up, L4, L3, L2, L1, T12. A body below the lowest disc, where labelled, is S1.

**SPIDER pixel spacing** (``spider_spacing_mm``): the set has none, so it is estimated from the
anatomy: the median centre-to-centre distance of the L1–L5 bodies of the central slice is taken
as 36 mm (an adult lumbar segment, body ~27 mm plus disc ~9 mm). This gives 0.44–0.62 mm per
pixel, as the set's README suggests (0.5–0.6 mm).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from scoring.engine.dicom_io import read_series
from scoring.engine.model import VBQ_LEVELS, VbqMeasurement
from scoring.engine.vbq import compute_vbq

SIEGEN_EXAMS = ("DzZ_T1", "DzZ_T2", "F02")
LEVEL_CODES = {"L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "S1": 6, "T12": 12}
LUMBAR_SEGMENT_MM = 36.0
ENV_VAR = "VBQ_REAL_MRI_DIR"
FOLD_ENV_VAR = "VBQ_REAL_FOLD"


def default_dir(repo_root: Path) -> Path:
    """``$VBQ_REAL_MRI_DIR`` if set, else ``../shared/mri`` relative to the repository root."""
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else (repo_root.parent / "shared" / "mri")


def t1_like(volume: np.ndarray, marrow: np.ndarray, fluid: np.ndarray | None = None,
            marrow_to_fluid: float = 3.0) -> np.ndarray:
    """A T2 volume folded about its marrow level, uint16 (see the module docstring).
    ``marrow``: a mask of vertebral bone, used only for that one number. ``fluid`` (optional):
    a mask of the canal, used only for its median ``c``: intensities above the marrow level
    are then folded with the slope that brings ``c`` to ``m / marrow_to_fluid`` (CSF as dark
    against marrow as on T1, instead of black)."""
    v = np.asarray(volume, np.float32)
    m = float(np.median(v[marrow]))
    slope = 1.0
    if fluid is not None and fluid.any():
        c = float(np.median(v[fluid]))
        if c > m:
            slope = (m - m / marrow_to_fluid) / (c - m)
    folded = np.where(v > m, m - slope * (v - m), v)  # = m - |x - m| with slope 1
    return np.clip(np.rint(folded), 0, 65535).astype(np.uint16)


def datasets_from_volume(volume: np.ndarray, spacing_mm: tuple[float, float],
                         description: str) -> list[Dataset]:
    """Sagittal MR datasets (rows head→feet, columns anterior→posterior) of a (slices, rows,
    cols) volume, with a T1 protocol (TR 550 ms, TE 12 ms): the engine's input for images that
    come without a DICOM header of their own."""
    pixels = np.asarray(volume).astype(np.uint16)
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i, image in enumerate(pixels):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality, ds.SeriesDescription = "MR", description
        ds.InstanceNumber = i + 1
        ds.RepetitionTime, ds.EchoTime, ds.MagneticFieldStrength = 550.0, 12.0, 1.5
        ds.SliceThickness = 3.0
        ds.PixelSpacing = [float(spacing_mm[0]), float(spacing_mm[1])]
        ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        ds.ImagePositionPatient = [float(-3.0 * i), 0.0, 0.0]
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = np.ascontiguousarray(image).tobytes()
        out.append(ds)
    return out


@dataclass
class CaseResult:
    """One exam or person scored against its truth."""

    name: str
    kind: str  # "siegen" | "spider"
    status: str
    confidence: float
    bodies_found: int
    level_ok: dict[str, bool] = field(default_factory=dict)
    csf_ok: bool | None = None
    vbq: float | None = None
    vbq_reference: float | None = None
    protocol_refusal: str = ""
    reason: str = ""
    flags: list[str] = field(default_factory=list)  # codes of the non-info QC flags

    @property
    def levels_right(self) -> bool:
        return all(self.level_ok.get(lv, False) for lv in VBQ_LEVELS)

    @property
    def confident(self) -> bool:
        return self.status == "succeeded"

    @property
    def vbq_error(self) -> float | None:
        if self.vbq is None or not self.vbq_reference:
            return None
        return self.vbq / self.vbq_reference - 1.0


def _reason(m: VbqMeasurement) -> str:
    return "; ".join(f"{f.code}: {f.message}" for f in m.qc_flags if f.severity != "info")


def _codes(m: VbqMeasurement) -> list[str]:
    return [f.code for f in m.qc_flags if f.severity not in ("info", "refusal")]


def _near(mask: np.ndarray, r: float, c: float) -> bool:
    """``mask`` (2-D) true within ±1 pixel of (r, c)."""
    rr, cc = round(r), round(c)
    return bool(mask[max(rr - 1, 0): rr + 2, max(cc - 1, 0): cc + 2].any())


def score_siegen(folder: Path) -> CaseResult:
    """Score one Siegen exam. T2 exams: protocol QC's refusal is recorded, then the automatic
    path runs on ``t1_like`` of the same pixels. Levels: each L1–L4 ROI centre within ±1 voxel
    of its truth body. CSF (no CSF mask in the set): the ROI centre lies on a row of the truth
    L2–L4 bodies, 0–15 mm posterior to the truth body's posterior edge on that row and slice
    (the thecal sac lies directly behind the bodies), within ±3 slices of the truth
    mid-sagittal slice."""
    name = folder.name
    truth = np.load(folder / "truth.npz")
    labels = truth["label_level"]  # (rows, cols, slices) on InstanceNumber - 1
    files = sorted((folder / "dicom").glob("*.dcm"))
    series = read_series(files)
    instance = [int(ds.InstanceNumber) - 1 for ds in series.datasets]
    m = compute_vbq(files)
    refusal = "; ".join(f.code for f in m.qc_flags if f.severity == "refusal")
    if refusal:
        bone = np.transpose(labels, (2, 0, 1))[instance] > 0  # in the series' slice order
        remapped = t1_like(np.asarray(series.pixels), bone)
        m = compute_vbq(datasets_from_volume(remapped, series.pixel_spacing_mm,
                                             "SAG T1-LIKE FOLDED (DEVELOPMENT)"))
        # datasets_from_volume stores slices in the series' order: slice i = series slice i
    level_ok: dict[str, bool] = {}
    for lv in VBQ_LEVELS:
        got = m.levels.get(lv)
        if got is None:
            level_ok[lv] = False
            continue
        k = instance[got.roi.slice_index]
        ok = False
        for dk in (-1, 0, 1):
            if 0 <= k + dk < labels.shape[2] and _near(labels[:, :, k + dk] == LEVEL_CODES[lv],
                                                       got.roi.row, got.roi.col):
                ok = True
        level_ok[lv] = ok
    csf_ok: bool | None = None
    if m.csf is not None:
        roi = m.csf.roi
        k = instance[roi.slice_index]
        mid = int(truth["mid_sagittal_slice"])
        r = round(roi.row)
        sl = labels[:, :, k]
        row = np.isin(sl[r], (2, 3, 4)) if 0 <= r < sl.shape[0] else np.zeros(1, bool)
        spacing = series.pixel_spacing_mm[1]
        if row.any() and abs(k - mid) <= 3:
            post = int(np.flatnonzero(row)[-1])
            csf_ok = bool(0 < (roi.col - post) * spacing <= 15.0)
        else:
            csf_ok = False
    ref = None
    meta = json.loads((folder / "truth.json").read_text())
    if meta.get("reference_vbq"):
        ref = float(meta["reference_vbq"]["vbq_reference"])
    return CaseResult(name=name, kind="siegen", status=m.status,
                      confidence=m.confidence, bodies_found=len(m.levels), level_ok=level_ok,
                      csf_ok=csf_ok, vbq=m.vbq_all_levels, vbq_reference=ref,
                      protocol_refusal=refusal, reason=_reason(m), flags=_codes(m))


def spider_levels(mask: np.ndarray, spacing_mm: float | None = None
                  ) -> dict[str, np.ndarray]:
    """Level → body mask on one SPIDER slice (see the module docstring). ``spacing_mm``
    (None: 0.5) sets the minimum sizes."""
    px_mm2 = (spacing_mm or 0.5) ** 2
    canal = mask == 3
    ant = np.full(mask.shape[0], np.nan)
    rows = np.flatnonzero(canal.any(axis=1))
    if rows.size == 0:
        return {}
    for r in rows:
        ant[r] = np.flatnonzero(canal[r])[0]
    ant = np.interp(np.arange(mask.shape[0]), rows, ant[rows])
    lab, _ = ndimage.label(mask == 1)
    bodies = []
    for i, sl in enumerate(ndimage.find_objects(lab), start=1):
        comp = lab[sl] == i
        rr, cc = np.nonzero(comp)
        rr, cc = rr + sl[0].start, cc + sl[1].start
        if rr.size * px_mm2 < 80.0 or np.mean(cc < ant[rr]) < 0.7:
            continue
        bodies.append((float(rr.mean()), i))
    dl, nd = ndimage.label(mask == 2)
    sizes = ndimage.sum(mask == 2, dl, range(1, nd + 1))
    centres = ndimage.center_of_mass(mask == 2, dl, range(1, nd + 1))
    discs = sorted(c[0] for c, z in zip(centres, sizes, strict=True) if z * px_mm2 >= 20.0)
    if not discs or not bodies:
        return {}
    bodies.sort()
    lowest = discs[-1]
    above = [b for b in bodies if b[0] < lowest]
    below = [b for b in bodies if b[0] > lowest]
    out = {name: lab == b[1] for name, b in zip(("L5", "L4", "L3", "L2", "L1", "T12"),
                                                reversed(above), strict=False)}
    if below:
        out["S1"] = lab == below[0][1]
    return out


def spider_spacing_mm(mask: np.ndarray) -> float:
    """Pixel spacing (mm) estimated from the L1–L5 body spacing (see the module docstring)."""
    centre = mask.shape[0] // 2
    levels = spider_levels(mask[centre])
    rows = [float(np.nonzero(levels[lv])[0].mean()) for lv in ("L1", "L2", "L3", "L4", "L5")
            if lv in levels]
    if len(rows) < 2:
        return 0.55
    return LUMBAR_SEGMENT_MM / float(np.median(np.diff(rows)))


def fold_mode() -> str:
    """``VBQ_REAL_FOLD``: ``plain`` (default: ``m - |x - m|``, CSF nearly black) or ``csf``
    (the canal's median brought to a third of the marrow level, as on T1: the CSF checks then
    see a T1-like marrow/CSF ratio; SPIDER only, the Siegen set has no canal mask)."""
    return "csf" if os.environ.get(FOLD_ENV_VAR, "plain").strip().lower() == "csf" else "plain"


def score_spider(path: Path) -> CaseResult:
    """Score one SPIDER person: ``t1_like`` of its slices at the estimated spacing through the
    automatic path (``fold_mode``); levels against ``spider_levels`` of the ROI's slice
    (±1 pixel); CSF: the ROI centre inside the canal mask."""
    data = np.load(path)
    image, mask = data["image"], data["mask"]
    sp = spider_spacing_mm(mask)
    fluid = mask == 3 if fold_mode() == "csf" else None
    m = compute_vbq(datasets_from_volume(t1_like(image, mask == 1, fluid), (sp, sp),
                                         "SAG T1-LIKE SPIDER FOLDED (DEVELOPMENT)"))
    level_ok: dict[str, bool] = {}
    cache: dict[int, dict[str, np.ndarray]] = {}
    for lv in VBQ_LEVELS:
        got = m.levels.get(lv)
        if got is None:
            level_ok[lv] = False
            continue
        s = got.roi.slice_index
        if s not in cache:
            cache[s] = spider_levels(mask[s], sp)
        body = cache[s].get(lv)
        level_ok[lv] = body is not None and _near(body, got.roi.row, got.roi.col)
    csf_ok: bool | None = None
    if m.csf is not None:
        roi = m.csf.roi
        r, c = round(roi.row), round(roi.col)
        csf_ok = bool(mask[roi.slice_index][r, c] == 3)
    return CaseResult(name=path.stem, kind="spider", status=m.status, confidence=m.confidence,
                      bodies_found=len(m.levels), level_ok=level_ok, csf_ok=csf_ok,
                      vbq=m.vbq_all_levels, reason=_reason(m), flags=_codes(m))


def siegen_folders(root: Path) -> list[Path]:
    return [root / "siegen" / e for e in SIEGEN_EXAMS if (root / "siegen" / e).is_dir()]


def spider_files(root: Path) -> list[Path]:
    return sorted((root / "spider_t2").glob("spider_*.npz"))

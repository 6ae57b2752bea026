"""SYNTHETIC sagittal lumbar MRI phantoms with known truth (never a real patient).

``make_phantom(seed, **variations)`` draws a series: T10–S1 vertebral bodies (truth for T12–S1)
with cortical rims, endplates and a basivertebral vein, discs, a sacrum continuing inferiorly
and posteriorly, a canal with CSF, cord (conus at L1–L2) and cauda equina roots, posterior
elements, epidural and subcutaneous fat, paraspinal muscle, air behind the back, lordosis,
tilt, scoliosis (a lateral curve: levels are sharpest on different slices), wedge fractures
with altered marrow signal, Rician noise, a smooth bias field, partial volume (lateral
profiles and in-plane blur), and varying TR/TE/field of view/matrix/slice count/field strength
and tissue intensities (marrow/CSF ratio 1.5–5, every tissue drawn per phantom).
Variants: ``contrast="t2"``, ``fat_suppressed=True``, ``plane="axial"``, ``gadolinium=True``
for QC tests; ``ap_flip=True`` stores the columns posterior→anterior.

``random_phantom(seed)`` also draws the matrix (256–512), slice count (11–19), variants... as the
accuracy bench does.

Ground truth (``Phantom.truth``): level centres in pixels, per-level core masks, the true SI
per level and of the CSF at L3, and the true VBQ (all levels / excluding fractured), measured on
the noise-free image with the engine's definition: median SI of the central 60 % (height and
AP width, along the body's own axis) of each body without the basivertebral vein, on the
mid-sagittal slice; CSF = median SI of the pure-CSF interior of the thecal sac at L3 (away from
the walls, cord and roots) on the slice through the middle of the canal at L3.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")
DRAWN = ("T10", "T11", *LEVELS)
BODY, CANAL, FIXED = 1, 2, 3  # lateral partial-volume classes


@dataclass
class Phantom:
    datasets: list[Dataset]
    truth: dict = field(default_factory=dict)

    def write(self, folder: str | Path) -> list[Path]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, ds in enumerate(self.datasets):
            path = folder / f"IM{i:04d}.dcm"
            ds.save_as(str(path), enforce_file_format=True)
            paths.append(path)
        return paths


def _tissues(rng: np.random.Generator, kind: str, fat_suppressed: bool,
             marrow_csf_ratio: float | None = None) -> dict[str, float]:
    """Tissue intensities drawn per phantom (T1 physics: CSF darkest fluid, marrow brighter than
    disc and muscle, fat bright)."""
    csf = float(rng.uniform(120, 420))
    ratio = float(rng.uniform(1.5, 5.0))  # drawn even when overridden: seeds stay stable
    if marrow_csf_ratio is not None:
        ratio = float(marrow_csf_ratio)
    marrow = csf * ratio
    upper = min(2.0, ratio / 1.15)
    muscle = csf * float(rng.uniform(1.12, max(1.13, upper)))
    disc = csf * float(rng.uniform(1.08, max(1.09, upper)))
    tissue = {
        "marrow": marrow, "csf": csf, "disc": disc, "muscle": muscle,
        "cortex": csf * float(rng.uniform(0.2, 0.6)),
        "fat": max(marrow, muscle) * float(rng.uniform(1.05, 1.5)),
        "cord": csf * float(rng.uniform(1.4, 2.2)),
        "posterior": marrow * float(rng.uniform(0.8, 1.05)),
        "vein": marrow * float(rng.uniform(0.55, 1.45)),
        "fracture": float(rng.uniform(0.5, 0.85)),
        "air": csf * 0.02,
    }
    if kind == "t2":
        tissue.update(csf=marrow * float(rng.uniform(1.3, 2.5)), disc=marrow * 1.2,
                      cord=marrow * 0.8, cortex=marrow * 0.1, fracture=1.3,
                      muscle=marrow * 0.5)
    if fat_suppressed:
        tissue.update(marrow=0.3 * marrow, fat=0.15 * tissue["fat"],
                      posterior=0.3 * tissue["posterior"], vein=0.3 * tissue["vein"])
    return tissue


def random_phantom(seed: int, **overrides: Any) -> Phantom:
    """A phantom with every variation drawn from ``seed`` (matrix, slices, variants)."""
    rng = np.random.default_rng(seed + 7_000_000)
    rows = int(rng.choice([256, 320, 384, 448, 512]))
    cols = rows if rng.random() < 0.7 else int(rows * float(rng.uniform(0.7, 0.95))) // 2 * 2
    kw: dict[str, Any] = {
        "rows": rows, "cols": cols,
        "slices": int(rng.integers(11, 20)), "ap_flip": bool(rng.random() < 0.15),
    }
    kw.update(overrides)
    return make_phantom(seed, **kw)


def make_phantom(
    seed: int,
    *,
    rows: int = 256,
    cols: int = 256,
    slices: int = 13,
    contrast: str = "t1",
    fat_suppressed: bool = False,
    plane: str = "sagittal",
    fractured: tuple[str, ...] | None = None,
    gadolinium: bool = False,
    ap_flip: bool = False,
    marrow_csf_ratio: float | None = None,
) -> Phantom:
    """Draw one SYNTHETIC series. Random choices come from ``seed``; explicit keywords override.

    ``marrow_csf_ratio`` fixes the marrow/CSF signal ratio (the true VBQ then lands near it,
    give or take the per-level variation and bias field); the demo cohort uses it.
    """
    rng = np.random.default_rng(seed)
    fov_mm = float(rng.uniform(290, 360))
    spacing_r = fov_mm / rows
    spacing_c = spacing_r * (float(rng.uniform(0.9, 1.1)) if rng.random() < 0.15 else 1.0)
    thickness = float(rng.uniform(3.0, 4.5))
    field_t = float(rng.choice([1.5, 3.0]))
    tr = float(rng.uniform(420, 800)) if contrast == "t1" else float(rng.uniform(2500, 4500))
    te = float(rng.uniform(8, 18)) if contrast == "t1" else float(rng.uniform(80, 110))
    tissue = _tissues(rng, contrast, fat_suppressed, marrow_csf_ratio)
    if fractured is None:
        fractured = tuple(rng.choice(["L1", "L2", "L3", "L4"], size=1)) if rng.random() < 0.3 \
            else ()
    lordosis_mm = float(rng.uniform(0, 16))
    tilt_deg = float(rng.uniform(-10, 10))
    scoliosis_mm = float(rng.uniform(-7, 7)) if rng.random() < 0.35 else 0.0
    midline_mm = float(rng.uniform(-0.5, 0.5)) * thickness
    noise_sigma = tissue["csf"] * float(rng.uniform(0.03, 0.08))
    bias_strength = float(rng.uniform(0.0, 0.3))
    sacral_deg = float(rng.uniform(5, 25))

    # geometry (mm): r superior(-) → inferior(+), c anterior(-) → posterior(+)
    body_h = float(rng.uniform(22, 29))
    disc_h = float(rng.uniform(6, 11))
    body_w = float(rng.uniform(32, 44))
    canal_w = float(rng.uniform(10, 17))
    n = len(DRAWN)
    heights = [body_h * (1 + 0.02 * (i - 3)) * float(rng.uniform(0.95, 1.05)) for i in range(n)]
    widths = [body_w * (1 + 0.02 * (i - 3)) for i in range(n)]
    discs = [disc_h * float(rng.uniform(0.85, 1.15)) for _ in range(n)]
    discs[n - 2] *= 0.8  # L5–S1
    along = [0.0]
    for i in range(1, n):
        along.append(along[-1] + heights[i - 1] / 2 + discs[i - 1] + heights[i] / 2)
    span = along[-1] - along[2]  # T12 → S1
    # place T12..S1 inside the field of view (T10/T11 may leave it)
    lo = -fov_mm / 2 + heights[2] / 2 + 4 - along[2]
    hi = fov_mm / 2 - heights[-1] / 2 - 25 - along[-1]
    shift = float(rng.uniform(lo, hi)) if hi > lo else (lo + hi) / 2
    x0 = float(rng.uniform(-45, -10))
    ys = np.array(along) + shift
    y12 = ys[2]

    def centre_x(y: np.ndarray | float) -> np.ndarray | float:
        return x0 - lordosis_mm * np.sin(np.pi * (np.asarray(y) - y12) / span) + np.tan(
            np.radians(tilt_deg)) * np.asarray(y)

    xs = [float(centre_x(y)) for y in ys]
    eps = 0.5
    thetas = [float(np.arctan((centre_x(y + eps) - centre_x(y - eps)) / (2 * eps))) for y in ys]
    lateral = [midline_mm + scoliosis_mm * float(np.sin(np.pi * (y - y12) / span)) for y in ys]

    mm_r = (np.arange(rows) - rows / 2 + 0.5) * spacing_r
    mm_c = (np.arange(cols) - cols / 2 + 0.5) * spacing_c
    rr, cc = np.meshgrid(mm_r, mm_c, indexing="ij")

    def frame(y: float, x: float, th: float) -> tuple[np.ndarray, np.ndarray]:
        u = (rr - y) * np.cos(th) + (cc - x) * np.sin(th)
        v = -(rr - y) * np.sin(th) + (cc - x) * np.cos(th)
        return u, v

    # static background: abdomen, muscle, subcutaneous fat, air
    spine_x = np.asarray(centre_x(rr))
    back = spine_x + widths[3] / 2 + 2 + canal_w + 32 + float(rng.uniform(8, 30))
    skin = back + float(rng.uniform(10, 45))
    base = np.where(cc < spine_x - widths[3] / 2 - 25, tissue["muscle"] * 0.85, tissue["muscle"])
    base = np.where(cc > back, tissue["fat"], base)
    base = np.where(cc > skin, tissue["air"], base)
    value = base.copy()
    klass = np.full((rows, cols), FIXED, np.int8)
    lat_map = np.zeros((rows, cols))
    core_masks: dict[str, np.ndarray] = {}
    body_masks: dict[str, np.ndarray] = {}
    csf_interior: dict[str, np.ndarray] = {}
    conus_y = ys[3] + float(rng.uniform(-0.2, 1.2)) * (ys[4] - ys[3])
    fr_loss: dict[str, float] = {}

    def paint(mask: np.ndarray, val: float | np.ndarray, cls: int, lat: float) -> None:
        value[mask] = val if np.isscalar(val) else np.asarray(val)[mask]
        klass[mask] = cls
        lat_map[mask] = lat

    level_marrow = {}
    for level in DRAWN:
        level_marrow[level] = tissue["marrow"] * float(rng.uniform(0.9, 1.1))
        if level in fractured:
            level_marrow[level] *= tissue["fracture"]
            fr_loss[level] = float(rng.uniform(0.22, 0.4))
    # discs first (bodies overwrite their edges)
    for i in range(n - 1):
        y = (ys[i] + heights[i] / 2 + ys[i + 1] - heights[i + 1] / 2) / 2
        th = (thetas[i] + thetas[i + 1]) / 2
        u, v = frame(y, float(centre_x(y)), th)
        disc = (np.abs(u) <= discs[i] / 2 + 2.5) & (np.abs(v) <= (widths[i] + widths[i + 1]) / 4
                                                    - 1)
        paint(disc, tissue["disc"], BODY, (lateral[i] + lateral[i + 1]) / 2)
    cortex_mm = float(rng.uniform(1.0, 2.0))
    for i, level in enumerate(DRAWN):
        y, x, th, w, h = ys[i], xs[i], thetas[i], widths[i], heights[i]
        u, v = frame(y, x, th)
        loss = fr_loss.get(level, 0.0)
        rel = np.clip((v + w / 2) / w, 0, 1)
        local_h = h * (1 - loss) + h * loss * rel  # wedge: anterior lower
        inside = (np.abs(v) <= w / 2) & (np.abs(u) <= local_h / 2)
        if level == "S1":
            ext = float(rng.uniform(45, 75))
            ths = th + np.radians(sacral_deg)  # the sacrum turns posteriorly
            us, vs = frame(y + h / 2 * np.cos(th), x + h / 2 * np.sin(th), ths)
            taper = np.clip(us / ext, 0, 1) * 0.5 * w
            sacrum = (us >= -2) & (us <= ext) & (vs >= -w / 2 + taper) & (vs <= w / 2)
            inside |= sacrum
        interior = (np.abs(v) <= w / 2 - cortex_mm) & (np.abs(u) <= local_h / 2 - cortex_mm)
        if level == "S1":
            interior |= sacrum & (vs >= -w / 2 + taper + cortex_mm) & (vs <= w / 2 - cortex_mm) & (
                us <= ext - cortex_mm)
        rim = inside & ~interior
        vein_v = w / 2 - float(rng.uniform(6, 9))
        vein = inside & ((v - vein_v) ** 2 / 16 + u**2 / 9 < 1)
        paint(inside, level_marrow[level], BODY, lateral[i])
        paint(vein, tissue["vein"], BODY, lateral[i])
        paint(rim, tissue["cortex"], BODY, lateral[i])
        body_masks[level] = inside.copy()
        core_masks[level] = interior & (np.abs(u) <= 0.3 * local_h) & (np.abs(v) <= 0.3 * w) & (
            ~vein)
        # canal (thecal sac) and posterior elements behind the body
        vc = w / 2 + 2.0 + canal_w / 2
        reach = (h + discs[min(i, n - 2)]) / 2 + 2.5
        extra = 30.0 if level == "S1" else 0.0
        canal = (np.abs(v - vc) <= canal_w / 2) & (u >= -reach) & (u <= reach + extra)
        paint(canal, tissue["csf"], CANAL, lateral[i])
        cord_mask = canal & (np.abs(v - vc) <= 3.5) & (rr <= conus_y)
        roots = canal & (np.abs(v - (vc + canal_w / 2 - 2.2)) <= 1.2) & (rr > conus_y)
        paint(cord_mask, tissue["cord"], CANAL, lateral[i])
        paint(roots, (tissue["cord"] + tissue["csf"]) / 2, CANAL, lateral[i])
        csf_interior[level] = canal & (np.abs(v - vc) <= canal_w / 2 - 2) & (
            np.abs(u) <= h / 2) & ~cord_mask & ~(np.abs(v - (vc + canal_w / 2 - 2.2)) <= 3.0)
        post = (v > vc + canal_w / 2 + 1) & (v < vc + canal_w / 2 + 31) & (np.abs(u) <= h / 2 - 2)
        paint(post, tissue["posterior"], FIXED, 0.0)
        if level not in ("S1",) and rng.random() < 0.5:
            epi = (v > vc + canal_w / 2) & (v <= vc + canal_w / 2 + 1.5) & (np.abs(u) <= h / 3)
            paint(epi, tissue["fat"], FIXED, 0.0)

    slice_offsets = (np.arange(slices) - (slices - 1) / 2) * thickness
    lat_l3 = lateral[DRAWN.index("L3")]
    mid = int(np.argmin(np.abs(slice_offsets - lat_l3)))
    bias = 1 + bias_strength * (rr / (fov_mm / 2)) + 0.5 * bias_strength * (
        cc / (fov_mm / 2)) ** 2
    blur = (0.35 / spacing_r * 1.0, 0.35 / spacing_c * 1.0)

    def clean_slice(offset: float) -> np.ndarray:
        d = np.abs(offset - lat_map)
        w_body = np.clip(1 - (d / 22.0) ** 4, 0, 1)
        w_canal = np.clip(1 - (d / 8.0) ** 2, 0, 1)
        weight = np.where(klass == BODY, w_body, np.where(klass == CANAL, w_canal, 1.0))
        img = (base + weight * (value - base)) * bias
        return ndimage.gaussian_filter(img, blur)

    volume = []
    clean_mid = clean_slice(slice_offsets[mid])
    for s in range(slices):
        img = clean_mid if s == mid else clean_slice(slice_offsets[s])
        n1 = rng.normal(0, noise_sigma, img.shape)
        n2 = rng.normal(0, noise_sigma, img.shape)
        volume.append(np.sqrt((img + n1) ** 2 + n2**2))

    si = {lv: float(np.median(clean_mid[core_masks[lv]])) for lv in ("L1", "L2", "L3", "L4")}
    csf_si = float(np.median(clean_mid[csf_interior["L3"]]))
    vbq_all = float(np.median(list(si.values()))) / csf_si
    kept = [v for k, v in si.items() if k not in fractured]
    vbq_excl = float(np.median(kept)) / csf_si if kept else None

    def px(level: str) -> tuple[int, float, float]:
        i = DRAWN.index(level)
        col = (xs[i] / spacing_c + cols / 2 - 0.5)
        return (mid, float(ys[i] / spacing_r + rows / 2 - 0.5),
                float(cols - 1 - col if ap_flip else col))

    l3 = DRAWN.index("L3")
    csf_rc = np.argwhere(csf_interior["L3"]).mean(axis=0)
    truth = {
        "vbq_all_levels": vbq_all, "vbq_excluding_fractured": vbq_excl,
        "fractured": list(fractured), "mid_slice": mid,
        "centres_px": {lv: px(lv) for lv in LEVELS},
        "csf_px": (mid, float(csf_rc[0]), float(cols - 1 - csf_rc[1] if ap_flip
                                                else csf_rc[1])),
        "theta_deg": {lv: float(np.degrees(thetas[DRAWN.index(lv)])) for lv in LEVELS},
        "body_height_mm": {lv: heights[DRAWN.index(lv)] for lv in LEVELS},
        "body_width_mm": {lv: widths[DRAWN.index(lv)] for lv in LEVELS},
        "canal_width_mm": canal_w, "height_loss": fr_loss,
        "si": si, "csf_si": csf_si, "spacing_mm": spacing_r, "spacing_rc_mm": (spacing_r,
                                                                                spacing_c),
        "contrast": contrast, "fat_suppressed": fat_suppressed, "plane": plane,
        "field_strength_t": field_t, "lordosis_mm": lordosis_mm, "tilt_deg": tilt_deg,
        "scoliosis_mm": scoliosis_mm, "noise_sigma": noise_sigma,
        "marrow_csf_ratio": tissue["marrow"] / tissue["csf"], "ap_flip": ap_flip,
        "rows": rows, "cols": cols, "slices": slices, "l3_theta": thetas[l3],
        "masks": {**{lv: core_masks[lv][:, ::-1] if ap_flip else core_masks[lv]
                     for lv in ("L1", "L2", "L3", "L4")},
                  "csf": csf_interior["L3"][:, ::-1] if ap_flip else csf_interior["L3"]},
        "body_masks": {lv: body_masks[lv][:, ::-1] if ap_flip else body_masks[lv]
                       for lv in LEVELS},
    }
    stack = np.stack(volume)
    if ap_flip:
        stack = stack[:, :, ::-1]
    datasets = _to_dicom(stack, seed, (spacing_r, spacing_c), thickness, slice_offsets, plane,
                         contrast, fat_suppressed, gadolinium, field_t, tr, te, ap_flip)
    return Phantom(datasets, truth)


def _to_dicom(volume: np.ndarray, seed: int, spacing: tuple[float, float], thickness: float,
              offsets: np.ndarray, plane: str, contrast: str, fat_suppressed: bool,
              gadolinium: bool, field_t: float, tr: float, te: float,
              ap_flip: bool = False) -> list[Dataset]:
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    scale = 4000.0 / max(float(volume.max()), 1.0)
    pixels = np.clip(np.round(volume * scale), 0, 65535).astype(np.uint16)
    rows, cols = pixels.shape[1:]
    if plane == "axial":
        orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    elif ap_flip:
        orientation = [0.0, -1.0, 0.0, 0.0, 0.0, -1.0]
    else:
        orientation = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    description = {"t1": "SYNTHETIC SAG T1", "t2": "SYNTHETIC SAG T2"}[contrast]
    if fat_suppressed:
        description += " FS"
    if gadolinium:
        description += " POST GAD"
    out = []
    for i, off in enumerate(offsets):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "MR"
        ds.PatientName = "SYNTHETIC^Phantom"
        ds.PatientID = f"SYN-{seed:06d}"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "SYN", "", ""
        ds.StudyTime = "000000"
        ds.StudyDescription = "SYNTHETIC MR LUMBAR SPINE"
        ds.SeriesDescription = description
        ds.StudyDate = dt.date(2025, 1, 1).strftime("%Y%m%d")
        ds.SeriesNumber, ds.InstanceNumber = 3, i + 1
        ds.Manufacturer, ds.ManufacturerModelName = "SYNTHETIC", "Phantom"
        ds.MagneticFieldStrength = field_t
        ds.RepetitionTime, ds.EchoTime = round(tr, 1), round(te, 1)
        ds.PixelBandwidth = 200.0
        ds.ScanningSequence = "SE"
        ds.SequenceName = "*tse2d1" if contrast == "t2" else "*se2d1"
        ds.ScanOptions = "FS" if fat_suppressed else ""
        if gadolinium:
            ds.ContrastBolusAgent = "gadobutrol"
        ds.BodyPartExamined = "LSPINE"
        ds.SliceThickness = round(thickness, 2)
        ds.PixelSpacing = [round(spacing[0], 6), round(spacing[1], 6)]
        ds.ImageOrientationPatient = orientation
        if plane == "axial":
            ds.ImagePositionPatient = [0.0, 0.0, float(off)]
        else:
            y0 = spacing[1] * cols / 2 if ap_flip else -spacing[1] * cols / 2
            ds.ImagePositionPatient = [float(-off), y0, spacing[0] * rows / 2]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = pixels[i].tobytes()
        out.append(ds)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a SYNTHETIC lumbar MRI phantom series")
    parser.add_argument("outdir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--contrast", choices=["t1", "t2"], default="t1")
    parser.add_argument("--random", action="store_true", help="draw matrix/slices too")
    args = parser.parse_args()
    phantom = (random_phantom(args.seed, contrast=args.contrast) if args.random
               else make_phantom(args.seed, contrast=args.contrast))
    phantom.write(args.outdir)
    print(f"wrote {len(phantom.datasets)} slices; true VBQ {phantom.truth['vbq_all_levels']:.3f}")


if __name__ == "__main__":
    main()

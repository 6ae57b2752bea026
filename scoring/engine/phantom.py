"""SYNTHETIC sagittal lumbar MRI phantoms with known truth (never a real patient).

``make_phantom(seed, **variations)`` draws a series: T12–S1 vertebral bodies with cortical rims,
endplates and a basivertebral vein, discs, a canal with CSF and cord/cauda, posterior elements,
paraspinal muscle and fat, lordosis, optional scoliosis (lateral drift), wedge fractures with
altered marrow signal, Rician noise, a smooth bias field, partial volume at the lateral edges,
and varying TR/TE/field of view/matrix/slice count/field strength. Variants: ``contrast="t2"``,
``fat_suppressed=True``, ``plane="axial"`` for QC tests. Ground truth: level centres, body
masks on the mid slice, and the true VBQ (all levels / excluding fractured) measured on the
noise-free image with the same definition as the engine.
"""

from __future__ import annotations

import argparse
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

LEVELS = ("T12", "L1", "L2", "L3", "L4", "L5", "S1")


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


def _contrast(kind: str, fat_suppressed: bool, marrow: float) -> dict[str, float]:
    if kind == "t2":
        return {"marrow": 0.55 * marrow, "csf": 1500.0, "disc": 900.0, "cortex": 80.0,
                "cord": 500.0, "muscle": 300.0, "fat": 900.0, "posterior": 500.0,
                "vein": 700.0, "fracture": 1.3}
    tissue = {"marrow": marrow, "csf": 220.0, "disc": 330.0, "cortex": 60.0, "cord": 420.0,
              "muscle": 380.0, "fat": 1050.0, "posterior": 620.0, "vein": 900.0,
              "fracture": 0.6}
    if fat_suppressed:
        tissue.update(marrow=0.25 * marrow, fat=120.0, posterior=220.0)
    return tissue


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
) -> Phantom:
    """Draw one SYNTHETIC series. Random choices come from ``seed``; explicit keywords override."""
    rng = np.random.default_rng(seed)
    fov_mm = float(rng.uniform(260, 340))
    spacing = fov_mm / rows
    thickness = float(rng.uniform(3.0, 4.5))
    field_t = float(rng.choice([1.5, 3.0]))
    tr = float(rng.uniform(420, 800)) if contrast == "t1" else float(rng.uniform(2500, 4500))
    te = float(rng.uniform(8, 18)) if contrast == "t1" else float(rng.uniform(80, 110))
    marrow_mean = float(rng.uniform(480, 980))
    tissue = _contrast(contrast, fat_suppressed, marrow_mean)
    if fractured is None:
        fractured = tuple(rng.choice(["L1", "L2", "L3", "L4"], size=1)) if rng.random() < 0.3 \
            else ()
    lordosis_mm = float(rng.uniform(0, 14))
    scoliosis_mm = float(rng.uniform(-8, 8)) if rng.random() < 0.3 else 0.0
    tilt_deg = float(rng.uniform(-6, 6))
    noise_sigma = float(rng.uniform(8, 20))
    bias_strength = float(rng.uniform(0.0, 0.25))

    mm_r = (np.arange(rows) - rows / 2) * spacing  # superior (-) → inferior (+)
    mm_c = (np.arange(cols) - cols / 2) * spacing  # anterior (-) → posterior (+)
    rr, cc = np.meshgrid(mm_r, mm_c, indexing="ij")
    body_h = float(rng.uniform(24, 29))
    disc_h = float(rng.uniform(7, 11))
    body_w = float(rng.uniform(34, 42))
    top = -3.3 * (body_h + disc_h)
    centres: dict[str, tuple[float, float]] = {}
    level_marrow: dict[str, float] = {}
    heights: dict[str, tuple[float, float]] = {}
    for i, level in enumerate(LEVELS):
        y = top + i * (body_h + disc_h) + body_h / 2
        x = -30.0 + lordosis_mm * np.sin(np.pi * (i / (len(LEVELS) - 1))) + np.tan(
            np.radians(tilt_deg)) * y
        centres[level] = (y, x)
        level_marrow[level] = tissue["marrow"] * float(rng.uniform(0.9, 1.1))
        if level in fractured:
            level_marrow[level] *= tissue["fracture"]
            loss = float(rng.uniform(0.22, 0.4))
            heights[level] = (body_h * (1 - loss), body_h)  # wedge: anterior lower
        else:
            heights[level] = (body_h, body_h)
    canal_w = float(rng.uniform(11, 15))

    slice_offsets = (np.arange(slices) - (slices - 1) / 2) * thickness
    mid = int(np.argmin(np.abs(slice_offsets - scoliosis_mm * 0.0)))
    volume = []
    truth_masks: dict[str, np.ndarray] = {}
    csf_mask_mid = np.zeros((rows, cols), bool)
    for s, lateral in enumerate(slice_offsets):
        img = np.full((rows, cols), 15.0)
        body_lat = max(0.0, 1 - (abs(lateral - scoliosis_mm * 0.3) / 22.0) ** 4)
        canal_lat = max(0.0, 1 - (abs(lateral - scoliosis_mm * 0.3) / 8.0) ** 2)
        # soft tissue: muscle behind, fat at the back, abdomen in front
        img[cc > -60] = tissue["muscle"]
        img[cc > 60] = tissue["fat"]
        img[cc < -60] = tissue["muscle"] * 0.8
        for i, level in enumerate(LEVELS):
            y, x = centres[level]
            h_ant, h_post = heights[level]
            rel = np.clip((cc - (x - body_w / 2)) / body_w, 0, 1)
            local_h = h_ant + (h_post - h_ant) * rel
            inside = (np.abs(cc - x) <= body_w / 2) & (np.abs(rr - y) <= local_h / 2)
            if level == "S1":
                inside |= (cc > x - body_w / 2) & (cc < x + body_w / 2) & (rr > y) & (
                    rr < y + 60) & (cc - x < (rr - y) * 0.6 + body_w / 2)
            rim = inside & ~((np.abs(cc - x) <= body_w / 2 - 2.0) & (
                np.abs(rr - y) <= local_h / 2 - 2.0))
            if body_lat > 0:
                img[inside] = (img[inside] * (1 - body_lat) + level_marrow[level] * body_lat)
                img[rim] = tissue["cortex"] * body_lat + img[rim] * (1 - body_lat)
                vein = inside & ((cc - (x + body_w / 2 - 8)) ** 2 / 16 + (rr - y) ** 2 / 9 < 1)
                img[vein] = tissue["vein"] * body_lat + img[vein] * (1 - body_lat)
            if i < len(LEVELS) - 1:
                y2, x2 = centres[LEVELS[i + 1]]
                disc_y = (y + heights[level][1] / 2 + y2 - heights[LEVELS[i + 1]][1] / 2) / 2
                disc = (np.abs(cc - (x + x2) / 2) <= body_w / 2 - 1) & (np.abs(rr - disc_y)
                                                                        <= disc_h / 2)
                img[disc] = tissue["disc"] * body_lat + img[disc] * (1 - body_lat)
            # canal and posterior elements behind each level
            canal_x = x + body_w / 2 + 2 + canal_w / 2
            canal = (np.abs(cc - canal_x) <= canal_w / 2) & (np.abs(rr - y) <= (
                body_h + disc_h) / 2 + 0.5)
            img[canal] = tissue["csf"] * canal_lat + img[canal] * (1 - canal_lat)
            if level in ("T12", "L1"):
                cord = canal & (np.abs(cc - canal_x) <= 3.0)
                img[cord] = tissue["cord"] * canal_lat + img[cord] * (1 - canal_lat)
            post = (cc > canal_x + canal_w / 2 + 1) & (cc < canal_x + canal_w / 2 + 30) & (
                np.abs(rr - y) <= body_h / 2 - 2)
            img[post] = tissue["posterior"]
            if s == mid:
                core = (np.abs(cc - x) <= body_w * 0.3) & (np.abs(rr - y) <= local_h * 0.3)
                truth_masks[level] = inside & core & ~vein
                if level == "L3":
                    csf_mask_mid = canal & (np.abs(cc - canal_x) <= canal_w / 2 - 2) & (
                        np.abs(rr - y) <= body_h / 2)
        if gadolinium:
            img *= 1.0
        bias = 1 + bias_strength * (rr / (fov_mm / 2)) + 0.5 * bias_strength * (
            cc / (fov_mm / 2)) ** 2
        img = img * bias
        if s == mid:
            clean_mid = img.copy()
        n1 = rng.normal(0, noise_sigma, img.shape)
        n2 = rng.normal(0, noise_sigma, img.shape)
        volume.append(np.sqrt((img + n1) ** 2 + n2**2))

    def med(mask: np.ndarray) -> float:
        return float(np.median(clean_mid[mask]))

    csf_si = med(csf_mask_mid)
    si = {lv: med(truth_masks[lv]) for lv in ("L1", "L2", "L3", "L4")}
    vbq_all = float(np.median(list(si.values()))) / csf_si
    kept = [v for k, v in si.items() if k not in fractured]
    vbq_excl = float(np.median(kept)) / csf_si if kept else None
    truth = {
        "vbq_all_levels": vbq_all, "vbq_excluding_fractured": vbq_excl,
        "fractured": list(fractured), "mid_slice": mid,
        "centres_px": {lv: (mid, centres[lv][0] / spacing + rows / 2,
                            centres[lv][1] / spacing + cols / 2) for lv in LEVELS},
        "si": si, "csf_si": csf_si, "spacing_mm": spacing, "contrast": contrast,
        "fat_suppressed": fat_suppressed, "plane": plane, "field_strength_t": field_t,
        "lordosis_mm": lordosis_mm, "scoliosis_mm": scoliosis_mm, "noise_sigma": noise_sigma,
    }
    datasets = _to_dicom(np.stack(volume), seed, spacing, thickness, slice_offsets, plane,
                         contrast, fat_suppressed, gadolinium, field_t, tr, te)
    return Phantom(datasets, truth)


def _to_dicom(volume: np.ndarray, seed: int, spacing: float, thickness: float,
              offsets: np.ndarray, plane: str, contrast: str, fat_suppressed: bool,
              gadolinium: bool, field_t: float, tr: float, te: float) -> list[Dataset]:
    study_uid, series_uid = generate_uid(), generate_uid()
    scale = 4000.0 / max(float(volume.max()), 1.0)
    pixels = np.clip(volume * scale, 0, 65535).astype(np.uint16)
    if plane == "axial":
        orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    else:
        orientation = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
    description = {"t1": "SYNTHETIC SAG T1", "t2": "SYNTHETIC SAG T2"}[contrast]
    if fat_suppressed:
        description += " FS"
    if gadolinium:
        description += " POST GAD"
    rows, cols = pixels.shape[1:]
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
        ds.Modality = "MR"
        ds.PatientName = "SYNTHETIC^Phantom"
        ds.PatientID = f"SYN-{seed:06d}"
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
        ds.PixelSpacing = [round(spacing, 4), round(spacing, 4)]
        ds.ImageOrientationPatient = orientation
        if plane == "axial":
            ds.ImagePositionPatient = [0.0, 0.0, float(off)]
        else:
            ds.ImagePositionPatient = [float(-off), -spacing * cols / 2, spacing * rows / 2]
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
    args = parser.parse_args()
    phantom = make_phantom(args.seed, contrast=args.contrast)
    phantom.write(args.outdir)
    print(f"wrote {len(phantom.datasets)} slices; true VBQ {phantom.truth['vbq_all_levels']:.3f}")


if __name__ == "__main__":
    main()

"""Read one DICOM MR series into a volume with geometry. Pure (pydicom + numpy).

Accepts a folder, a list of paths, or in-memory pydicom Datasets (e.g. from DICOMweb).
Compressed transfer syntaxes decode through pydicom's pixel-data handlers. Every failure is a
typed ``EngineError`` with a message a clinician can read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from scoring.engine.model import (
    Acquisition,
    EmptySeriesError,
    InconsistentSeriesError,
    NotAnImageError,
    UnreadableDicomError,
    WrongModalityError,
)


class PixelStack:
    """The pixel values of a series, (slices, rows, cols) float32 with the rescale applied,
    converted slice by slice when first used: the automatic path reads about half of the
    slices of a 20-slice series (and samples the others at a few points), so most of the
    float32 volume is never made. ``stack[i]`` (an int) is one slice (an ndarray, converted
    once); any other index, ``np.asarray(stack)`` or ``stack.volume()`` give the whole volume.
    The slices are decoded (and checked) when the series is read, only the conversion waits."""

    def __init__(self, raw: list[np.ndarray], rescale: list[tuple[float, float]]) -> None:
        self._raw = raw
        self._rescale = rescale
        rows, cols = raw[0].shape
        self.shape: tuple[int, int, int] = (len(raw), rows, cols)
        # one buffer for the volume, filled slice by slice (its untouched pages cost nothing;
        # one large block is also much cheaper for the allocator than a block per slice)
        self._buffer: np.ndarray | None = None
        self._done = np.zeros(len(raw), bool)
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def _buf(self) -> np.ndarray:
        if self._buffer is None:
            self._buffer = np.empty(self.shape, np.float32)
        return self._buffer

    def _filled(self, i: int) -> np.ndarray:
        out = self._buf()[i]
        if not self._done[i]:
            out[...] = self._raw[i]
            slope, intercept = self._rescale[i]
            if (slope, intercept) != (1.0, 0.0):
                out[...] = out * slope + intercept
            self._done[i] = True
        return out

    def slice(self, i: int) -> np.ndarray:
        """Slice ``i`` (negative counts from the end) as float32."""
        if i < 0:
            i += self.shape[0]
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"slice {i} outside a series of {self.shape[0]}")
        return self._filled(i)

    def stored(self, i: int) -> tuple[np.ndarray, float, float]:
        """Slice ``i`` as decoded (stored values, not converted) with its rescale slope and
        intercept: for passes that are linear in the values (block sums) and rescale after."""
        slope, intercept = self._rescale[i]
        return (self.slice(i) if self._done[i] else self._raw[i]), (
            1.0 if self._done[i] else slope), (0.0 if self._done[i] else intercept)

    def take(self, i: int, flat_index: np.ndarray) -> np.ndarray:
        """float32 values of slice ``i`` at flat (row-major) pixel indices, without
        converting the slice if it has not been."""
        if self._done[i]:
            return self.slice(i).reshape(-1).take(flat_index)
        values = np.ascontiguousarray(self._raw[i]).reshape(-1).take(flat_index).astype(
            np.float32)
        slope, intercept = self._rescale[i]
        if (slope, intercept) != (1.0, 0.0):
            values = values * slope + intercept
        return values

    def volume(self) -> np.ndarray:
        """The whole (slices, rows, cols) float32 volume."""
        for i in np.flatnonzero(~self._done):
            self._filled(int(i))
        return self._buf()

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, int | np.integer):
            return self.slice(int(key))
        result: np.ndarray = self.volume()[key]
        return result

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        volume = self.volume()
        return volume if dtype is None else volume.astype(dtype)


@dataclass
class Series:
    """Slices sorted along the slice normal. ``pixels``: (slices, rows, cols) float32, a
    ``PixelStack`` (slices converted when first used; ``np.asarray`` for the whole volume)."""

    datasets: list[Dataset]
    pixels: PixelStack
    orientation: np.ndarray  # 6 direction cosines (row, column)
    normal: np.ndarray
    positions: np.ndarray  # (slices, 3) ImagePositionPatient, mm, LPS
    pixel_spacing_mm: tuple[float, float]  # (row spacing, column spacing)
    series_instance_uid: str
    acquisition: Acquisition

    def patient_lps(self, slice_index: int, row: float, col: float) -> tuple[float, float, float]:
        """Patient coordinates (mm, DICOM LPS) of a pixel (row, col) on a slice."""
        origin = self.positions[slice_index]
        row_dir, col_dir = self.orientation[:3], self.orientation[3:]
        point = origin + row_dir * col * self.pixel_spacing_mm[1] + col_dir * row * (
            self.pixel_spacing_mm[0])
        return (float(point[0]), float(point[1]), float(point[2]))


def _load(source: Any) -> list[Dataset]:
    if isinstance(source, str | Path):
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise UnreadableDicomError(f"{path} does not exist")
        return [_read_file(p) for p in files]
    items = list(source) if isinstance(source, Iterable) else [source]
    out = []
    for item in items:
        out.append(item if isinstance(item, Dataset) else _read_file(Path(item)))
    return out


def _read_file(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, EOFError, ValueError, TypeError, AttributeError,
            KeyError, IndexError) as exc:
        raise UnreadableDicomError(f"{path.name} is not a readable DICOM file "
                                   f"({type(exc).__name__})") from exc


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def acquisition_of(ds: Dataset) -> Acquisition:
    spacing = ds.get("PixelSpacing")
    return Acquisition(
        field_strength_t=_float(ds, "MagneticFieldStrength"),
        repetition_time_ms=_float(ds, "RepetitionTime"),
        echo_time_ms=_float(ds, "EchoTime"),
        receive_bandwidth_hz_px=_float(ds, "PixelBandwidth"),
        manufacturer=str(ds.get("Manufacturer", "")),
        model=str(ds.get("ManufacturerModelName", "")),
        sequence_name=str(ds.get("SequenceName", "") or ds.get("ScanningSequence", "")),
        slice_thickness_mm=_float(ds, "SliceThickness"),
        pixel_spacing_mm=(float(spacing[0]), float(spacing[1])) if spacing else None,
        series_description=str(ds.get("SeriesDescription", "")),
    )


_NATIVE_SYNTAXES = {ImplicitVRLittleEndian, ExplicitVRLittleEndian}


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian single-frame grey-level image as a view of
    its bytes, with the values ``pixel_array`` gives (unused high bits of unsigned data
    masked); ``None`` for anything else (compressed, multi-frame, colour, signed with unused
    bits...), which then goes through pydicom's handlers. Skips ``pixel_array``'s generic
    decoder set-up, about a third of pydicom's read time for a 512 x 512 slice."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _NATIVE_SYNTAXES:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or frames != 1 or allocated not in (8, 16, 32) or not (
            0 < stored <= allocated) or (signed and stored != allocated) or rows < 1 or cols < 1:
        return None
    data = ds.PixelData
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    if not isinstance(data, bytes) or len(data) < rows * cols * dtype.itemsize:
        return None  # pydicom raises its own error for short data
    arr = np.frombuffer(data, dtype, count=rows * cols).reshape(rows, cols)
    if stored < allocated:
        arr = arr & dtype.type((1 << stored) - 1)
    return arr


def read_series(source: Any) -> Series:
    """Read, check and sort one series. Raises a typed ``EngineError``."""
    datasets = _load(source)
    if not datasets:
        raise EmptySeriesError("the series contains no DICOM files")
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if "" in modalities:
        missing = sum(1 for ds in datasets if not str(ds.get("Modality", "")))
        raise UnreadableDicomError(f"{missing} file(s) carry no modality: truncated, or not "
                                   "DICOM images")
    if modalities != {"MR"}:
        raise WrongModalityError(f"VBQ needs an MR series; this one is {sorted(modalities)}")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise InconsistentSeriesError(f"the files belong to {len(uids)} different series")
    images = [ds for ds in datasets if "PixelData" in ds]
    if not images:
        raise NotAnImageError("the files carry no image pixels")
    try:
        orientation = np.array([float(v) for v in images[0].ImageOrientationPatient])
        pixel_spacing = tuple(float(v) for v in images[0].PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotAnImageError("the images have no orientation or pixel spacing") from exc
    if orientation.shape != (6,) or not np.all(np.isfinite(orientation)):
        raise NotAnImageError("ImageOrientationPatient must hold 6 direction cosines")
    if len(pixel_spacing) != 2 or not all(v > 0 and np.isfinite(v) for v in pixel_spacing):
        raise NotAnImageError("PixelSpacing must hold 2 positive values")
    normal = np.cross(orientation[:3], orientation[3:])
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
        raise NotAnImageError("ImageOrientationPatient does not describe a plane")
    try:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in images])
    except (AttributeError, TypeError, ValueError) as exc:
        raise NotAnImageError("an image has no position") from exc
    if positions.ndim != 2 or positions.shape[1] != 3 or not np.isfinite(positions).all():
        raise NotAnImageError("ImagePositionPatient must hold 3 coordinates on every image")
    order = np.argsort(positions @ normal)
    images = [images[i] for i in order]
    positions = positions[order]
    arrays = []
    rescale = []
    for ds in images:
        try:
            arr = _native_pixels(ds)
            arrays.append(ds.pixel_array if arr is None else arr)
        except Exception as exc:  # truncated data, missing codec, bad lengths...
            raise UnreadableDicomError(f"the pixel data cannot be decoded "
                                       f"({type(exc).__name__}: {str(exc)[:120]})") from exc
        rescale.append((_float(ds, "RescaleSlope") or 1.0, _float(ds, "RescaleIntercept") or 0.0))
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InconsistentSeriesError(f"the images differ in size: {sorted(shapes)}")
    pixels = PixelStack(arrays, rescale)
    return Series(
        datasets=images, pixels=pixels, orientation=orientation, normal=normal,
        positions=positions, pixel_spacing_mm=(pixel_spacing[0], pixel_spacing[1]),
        series_instance_uid=str(images[0].get("SeriesInstanceUID", "")),
        acquisition=acquisition_of(images[0]),
    )


def describe_orientation(normal: Sequence[float] | np.ndarray) -> str:
    """sagittal | coronal | axial | oblique from the slice normal (LPS)."""
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]

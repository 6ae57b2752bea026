"""Train the learned segmenter (scoring/engine/learned.py) from ../shared/mri; export ONNX.

    nice -n 10 .venv/bin/python scripts/train_segmenter.py [--minutes 15] [--seed 0]

Needs torch (requirements-train.txt); the engine runs the exported model with onnxruntime.
Data: the SPIDER T2 people in ``../shared/mri/spider_t2`` (all 7 slices), minus ``HELD_OUT``
(``learned.held_out_people``: every 5th person in sorted order, 9 people, never
trained on). The Siegen exams are not trained
on (DzZ_T1/DzZ_T2 are the T1 check; their masks label bodies only); they are evaluated.

Targets per SPIDER slice (see learned.CLASSES): vertebra pixels anterior to the canal's anterior
edge → body, the one of them ``realset.spider_levels`` calls L5 → l5; vertebra pixels posterior
→ posterior; disc, canal as labelled. A slice whose levels cannot be derived (no canal/disc)
has its body pixels ignored. Resampled to ``learned.GRID_MM`` with the person's spacing
estimated by ``realset.spider_spacing_mm``.

Augmentation (SynthSeg-style contrast randomisation on the real images, so a T2-trained network
applies to T1): scale ±15 %, rotation ±12°, shift; then either a random intensity mapping per
label class (gain and offset drawn per class, background through a random non-monotonic
curve) or one random non-monotonic curve for the whole image; random inversion; gamma; a smooth
multiplicative bias field; blur; resolution loss along one axis; Gaussian noise.
Prints held-out Dice per class and level counting; writes the ONNX model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scoring.engine import learned  # noqa: E402
from scoring.engine.realset import default_dir, spider_files, spider_levels, spider_spacing_mm  # noqa: E402

N_CLASSES = len(learned.CLASSES)
IGNORE = 255
CROP = (192, 160)
SHARE_F02 = 0.08  # share of training samples from Siegen F02
SHARE_PHANTOM = 0.15  # share from SYNTHETIC phantoms


def spider_targets(mask: np.ndarray, sp: float) -> np.ndarray:
    """Per-pixel target classes of one SPIDER slice (native resolution)."""
    out = np.zeros(mask.shape, np.uint8)
    out[mask == 2] = 3
    out[mask == 3] = 4
    canal = mask == 3
    rows = np.flatnonzero(canal.any(axis=1))
    vert = mask == 1
    if rows.size == 0:
        out[vert] = IGNORE
        return out
    ant = np.array([np.flatnonzero(canal[r])[0] for r in rows], float)
    edge = np.interp(np.arange(mask.shape[0]), rows, ant)
    cols = np.arange(mask.shape[1])[None, :]
    anterior = vert & (cols < edge[:, None])
    out[vert & ~anterior] = 5
    levels = spider_levels(mask, sp)
    if "L5" not in levels:
        out[anterior] = IGNORE
        return out
    out[anterior] = 1
    out[levels["L5"]] = 2
    return out


def load_spider(path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    d = np.load(path)
    image, mask = d["image"], d["mask"]
    sp = spider_spacing_mm(mask)
    pairs = []
    for s in range(image.shape[0]):
        img = learned.normalise(learned.to_grid(image[s].astype(np.float32), (sp, sp)))
        tgt = learned.to_grid(spider_targets(mask[s], sp), (sp, sp), order=0)
        pairs.append((img, tgt))
    return pairs


def far_background(known: np.ndarray, spacing_mm: float, mm: float = 30.0) -> np.ndarray:
    """Pixels farther than ``mm`` from every labelled bone (``known``): background for sure."""
    dist = ndimage.distance_transform_edt(~known) * spacing_mm
    return np.asarray(dist > mm)


def load_f02(root: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Siegen F02 (T2 SE, fracture and spondylolisthesis; NOT DzZ_T1/DzZ_T2, the T1 check):
    the truth mid-sagittal slice ±3, targets body (T10–L4), l5 (L5), background (S1 and
    pixels > 30 mm from every labelled body); everything else ignored (no disc/canal masks)."""
    folder = root / "siegen" / "F02"
    if not folder.is_dir():
        return []
    import pydicom

    truth = np.load(folder / "truth.npz")
    lab = truth["label_level"]
    mid = int(truth["mid_sagittal_slice"])
    dss = sorted((pydicom.dcmread(p) for p in (folder / "dicom").glob("*.dcm")),
                 key=lambda ds: int(ds.InstanceNumber))
    pairs = []
    for k in range(max(mid - 3, 0), min(mid + 4, len(dss))):
        ds = dss[k]
        sp = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
        sl = lab[:, :, k]
        tgt = np.full(sl.shape, IGNORE, np.uint8)
        tgt[far_background(sl > 0, sp[0])] = 0
        tgt[np.isin(sl, (1, 2, 3, 4, 10, 11, 12))] = 1
        tgt[sl == 5] = 2
        tgt[sl == 6] = 0
        img = learned.normalise(learned.to_grid(ds.pixel_array.astype(np.float32), sp))
        pairs.append((img, learned.to_grid(tgt, sp, order=0)))
    return pairs


def load_phantoms(n: int, seed0: int = 900_000) -> list[tuple[np.ndarray, np.ndarray]]:
    """SYNTHETIC phantoms (``phantom.random_phantom``, seeds ``seed0``… far from the accuracy
    tests' 5000–5299; anterior→posterior columns): the mid-sagittal slice, targets body
    (T12–L4), l5 (L5), background (S1 with the sacrum: the phantoms' box-shaped sacrum must
    not pass for L5, and pixels > 30 mm from every body below T12's top); else ignored."""
    from scoring.engine.phantom import random_phantom

    pairs = []
    for i in range(n):
        ph = random_phantom(seed0 + i, ap_flip=False)
        t = ph.truth
        if t["plane"] != "sagittal":
            continue
        masks = t["body_masks"]
        sp = tuple(float(v) for v in t["spacing_rc_mm"])
        image = ph.datasets[t["mid_slice"]].pixel_array.astype(np.float32)
        known = np.zeros(image.shape, bool)
        for m in masks.values():
            known |= m
        tgt = np.full(image.shape, IGNORE, np.uint8)
        far = far_background(known, sp[0])
        top = int(np.flatnonzero(masks["T12"].any(axis=1))[0])
        far[:top] = False
        tgt[far] = 0
        for lv in ("T12", "L1", "L2", "L3", "L4"):
            tgt[masks[lv]] = 1
        tgt[masks["L5"]] = 2
        tgt[masks["S1"]] = 0
        img = learned.normalise(learned.to_grid(image, sp))
        pairs.append((img, learned.to_grid(tgt, sp, order=0)))
    return pairs


def _curve(rng: np.random.Generator, x: np.ndarray, knots: int = 6) -> np.ndarray:
    xs = np.linspace(0.0, 1.0, knots)
    ys = rng.uniform(0.0, 1.0, knots)
    return np.interp(x, xs, ys).astype(np.float32)


def augment(img: np.ndarray, tgt: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    h, w = CROP
    scale = rng.uniform(0.85, 1.15)
    ang = np.deg2rad(rng.uniform(-12, 12))
    c, s = np.cos(ang), np.sin(ang)
    mat = np.array([[c, -s], [s, c]]) / scale
    centre_out = np.array([h / 2, w / 2])
    centre_in = np.array(img.shape) / 2 + rng.uniform(-12, 12, 2)
    offset = centre_in - mat @ centre_out
    x = ndimage.affine_transform(img, mat, offset, output_shape=CROP, order=1, cval=0.0)
    y = ndimage.affine_transform(tgt, mat, offset, output_shape=CROP, order=0, cval=0)
    # contrast randomisation
    r = rng.random()
    if r >= 0.8:  # folded about the marrow level (bench/vbq_real.py's T1-like view of T2)
        bone = np.isin(y, (1, 2))
        m = float(np.median(x[bone])) if bone.any() else float(np.median(x))
        x = np.clip(m - np.abs(x - m), 0, None)
    elif r < 0.5:
        out = _curve(rng, x)  # background and anything unlabelled
        for k in range(1, N_CLASSES):
            sel = y == k
            if sel.any():
                out[sel] = rng.uniform(0.0, 1.0) + rng.uniform(-0.6, 0.6) * (x[sel] - x[sel].mean())
        x = out
    else:
        x = _curve(rng, x)
    if r < 0.8 and rng.random() < 0.3:
        x = 1.0 - x
    x = np.clip(x, 0, None) ** np.exp(rng.normal(0, 0.25))
    bias = ndimage.zoom(rng.normal(0, 0.3, (4, 4)), (h / 4, w / 4), order=3)[:h, :w]
    x = x * np.exp(bias)
    if rng.random() < 0.5:
        x = ndimage.gaussian_filter(x, rng.uniform(0.2, 1.2))
    if rng.random() < 0.3:  # thick slices / coarse matrix along one axis
        ax = int(rng.integers(2))
        f = rng.uniform(0.4, 0.8)
        z = [1.0, 1.0]
        z[ax] = f
        small = ndimage.zoom(x, z, order=1)
        x = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)[:h, :w]
    x = x + rng.normal(0, rng.uniform(0, 0.06), x.shape)
    x = learned.normalise(x)
    return x.astype(np.float32), y.astype(np.int64)


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """4-level U-Net (8-16-32-64) with a dilated bottleneck (context for level counting)."""

    def __init__(self, base: int = 8) -> None:
        super().__init__()
        ch = [base, base * 2, base * 4, base * 8]
        self.enc = nn.ModuleList([block(1, ch[0]), block(ch[0], ch[1]), block(ch[1], ch[2]),
                                  block(ch[2], ch[3])])
        self.mid = nn.Sequential(*[nn.Sequential(nn.Conv2d(ch[3], ch[3], 3, padding=d, dilation=d),
                                                 nn.BatchNorm2d(ch[3]), nn.ReLU(inplace=True))
                                   for d in (2, 4, 8)])
        self.up = nn.ModuleList([block(ch[3] + ch[2], ch[2]), block(ch[2] + ch[1], ch[1]),
                                 block(ch[1] + ch[0], ch[0])])
        self.head = nn.Conv2d(ch[0], N_CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, e in enumerate(self.enc):
            x = e(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = x + self.mid(x)
        for u, skip in zip(self.up, reversed(skips[:-1]), strict=True):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = u(torch.cat([x, skip], 1))
        return self.head(x)


def loss_fn(logits: torch.Tensor, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE)
    valid = (y != IGNORE).unsqueeze(1).float()
    p = torch.softmax(logits, 1) * valid
    oh = F.one_hot(torch.where(y == IGNORE, 0, y), N_CLASSES).permute(0, 3, 1, 2).float() * valid
    inter = (p * oh).sum((0, 2, 3))
    dice = (2 * inter + 1) / (p.sum((0, 2, 3)) + oh.sum((0, 2, 3)) + 1)
    return ce + (1 - dice[1:]).mean()


def dice(pred: np.ndarray, tgt: np.ndarray, k: int) -> float | None:
    valid = tgt != IGNORE
    a, b = (pred == k) & valid, (tgt == k) & valid
    if not b.any():
        return None
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--phantoms", type=int, default=160, help="SYNTHETIC phantom slices")
    ap.add_argument("--no-f02", action="store_true", help="leave Siegen F02 out")
    ap.add_argument("--out", default=str(learned.MODEL_PATH))
    args = ap.parse_args()
    torch.set_num_threads(1)  # on a shared, loaded 2-core machine 1 thread is ~3x faster than 2
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    files = spider_files(default_dir(ROOT))
    if not files:
        print("no SPIDER data under ../shared/mri; nothing to train")
        return 0
    held = learned.held_out_people([f.stem for f in files])
    train = [p for f in files if f.stem not in held for p in load_spider(f)]
    extra = {"f02": [] if args.no_f02 else load_f02(default_dir(ROOT)),
             "phantom": load_phantoms(args.phantoms)}
    print(f"train slices {len(train)} from {len(files) - len(held)} SPIDER people, "
          f"{len(extra['f02'])} F02, {len(extra['phantom'])} SYNTHETIC phantom; held out: "
          f"{sorted(held)}", flush=True)
    counts = np.bincount(np.concatenate([t[1].ravel() for t in train]), minlength=256)[:N_CLASSES]
    pools = [(train, 1.0 - SHARE_F02 * bool(extra["f02"]) - SHARE_PHANTOM * bool(extra["phantom"])),
             (extra["f02"], SHARE_F02), (extra["phantom"], SHARE_PHANTOM)]
    pools = [(pool, w) for pool, w in pools if pool]
    shares = np.array([w for _, w in pools]) / sum(w for _, w in pools)
    weights = torch.tensor((counts.sum() / (counts + 1)) ** 0.5, dtype=torch.float32)
    weights = weights / weights.mean()
    model = UNet()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    t0 = time.time()
    step = 0
    budget = args.minutes * 60
    model.train()
    while time.time() - t0 < budget:
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * frac))
        batch = []
        for _ in range(args.batch):
            pool = pools[int(rng.choice(len(pools), p=shares))][0]
            batch.append(augment(*pool[int(rng.integers(len(pool)))], rng))
        x = torch.from_numpy(np.stack([b[0] for b in batch])[:, None])
        y = torch.from_numpy(np.stack([b[1] for b in batch]))
        loss = loss_fn(model(x), y, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    train_s = time.time() - t0
    model.eval()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(model, torch.zeros(1, 1, 192, 160), str(out), input_names=["image"],
                      output_names=["logits"], opset_version=17, dynamo=False,
                      dynamic_axes={"image": {0: "n", 2: "h", 3: "w"},
                                    "logits": {0: "n", 2: "h", 3: "w"}})
    info = {"seed": args.seed, "steps": step, "f02_slices": len(extra["f02"]),
            "phantom_slices": len(extra["phantom"]), "train_seconds": round(train_s),
            "held_out": sorted(held), "bytes": out.stat().st_size}
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Helpers shared by the mask benchmarks (masks.py, dustnet.py): the real case, disagreements, contact sheets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "real"


def load_real(directory: Path):
    from aiflat_local.io import read_image, read_mask

    median, _ = read_image(directory / "median_left.png")
    if median.ndim == 3:
        median = median.mean(axis=2)
    cloud = read_mask(directory / "cloud_mask_left.png")  # soft JPEG edges: >= 128
    return median.astype(np.float32), cloud


def disagreements(pred: np.ndarray, ref: np.ndarray, score: np.ndarray, *, min_area: int = 9,
                   tol: int = 2) -> tuple[list[dict], list[dict]]:
    """Objects of *pred* (>= min_area px) far from *ref*, and objects of *ref* far from *pred*."""
    from scipy import ndimage

    from aiflat_local.metrics import disk

    eight = np.ones((3, 3), bool)
    near_ref = ndimage.binary_dilation(ref, structure=disk(tol)) if ref.any() else ref
    near_pred = ndimage.binary_dilation(pred, structure=disk(tol)) if pred.any() else pred

    def extra(a, near, s):
        labels, n = ndimage.label(a, structure=eight)
        out = []
        for k, sl in enumerate(ndimage.find_objects(labels), start=1):
            m = labels[sl] == k
            if m.sum() < min_area or (near[sl] & m).any():
                continue
            ys, xs = np.nonzero(m)
            out.append({"y": int(round(ys.mean() + sl[0].start)), "x": int(round(xs.mean() + sl[1].start)),
                        "area": int(m.sum()), "score": float(s[sl][m].max()) if s is not None else None,
                        "bbox": [int(sl[0].start), int(sl[1].start), int(sl[0].stop), int(sl[1].stop)]})
        return sorted(out, key=lambda o: -o["area"])

    return extra(pred, near_ref, score), extra(ref, near_pred, None)


def local_depth(image: np.ndarray, obj: dict) -> float:
    """Rough depth of an object: 1 - its 10th-percentile / the median of a ring around it."""
    y0, x0, y1, x1 = obj["bbox"]
    pad = max(6, (y1 - y0 + x1 - x0) // 2)
    ya, yb = max(y0 - pad, 0), min(y1 + pad, image.shape[0])
    xa, xb = max(x0 - pad, 0), min(x1 + pad, image.shape[1])
    box = image[ya:yb, xa:xb]
    inner = np.zeros(box.shape, bool)
    inner[y0 - ya:y1 - ya, x0 - xa:x1 - xa] = True
    ring = np.median(box[~inner]) if (~inner).any() else np.median(box)
    return float(1.0 - np.percentile(box[inner], 10) / max(ring, 1e-6))


def contact_sheet(image: np.ndarray, masks: dict[str, np.ndarray], items: list[tuple[str, dict]],
                  path: Path, size: int = 64, zoom: int = 3, per_row: int = 6) -> Path:
    """PNG of crops around *items*: the image (left) and the same crop with mask outlines (right).

    Outlines: cloud mask red, dustnet green, classical blue.
    """
    from PIL import Image, ImageDraw
    from scipy import ndimage

    colours = {"cloud": (255, 40, 40), "dustnet": (40, 230, 40), "classical": (60, 120, 255)}
    size = min(size, *image.shape[:2])  # small images: crops of the whole height or width
    cells = []
    for title, obj in items:
        cy, cx = obj["y"], obj["x"]
        y0 = int(np.clip(cy - size // 2, 0, image.shape[0] - size))
        x0 = int(np.clip(cx - size // 2, 0, image.shape[1] - size))
        crop = image[y0:y0 + size, x0:x0 + size].astype(np.float64)
        lo, hi = np.percentile(crop, 1), np.percentile(crop, 99.5)
        g = np.clip((crop - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
        plain = np.stack([g, g, g], -1)
        over = plain.copy()
        for name, m in masks.items():
            c = m[y0:y0 + size, x0:x0 + size]
            edge = c & ~ndimage.binary_erosion(c)
            over[edge] = colours.get(name, (255, 255, 0))
        cell = np.concatenate([plain, np.full((size, 2, 3), 255, np.uint8), over], axis=1)
        im = Image.fromarray(cell).resize((cell.shape[1] * zoom, size * zoom), Image.NEAREST)
        canvas = Image.new("RGB", (im.width, im.height + 14), (0, 0, 0))
        canvas.paste(im, (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), f"{title} y{cy} x{cx}", fill=(255, 255, 255))
        cells.append(np.asarray(canvas))
    if not cells:
        cells = [np.zeros((14 + size * zoom, (2 * size + 2) * zoom, 3), np.uint8)]
    rows = []
    for i in range(0, len(cells), per_row):
        row = cells[i:i + per_row]
        row += [np.zeros_like(cells[0])] * (per_row - len(row)) if len(cells) > per_row else []
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0))) for c in row], axis=1))
    sheet = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path)
    return path

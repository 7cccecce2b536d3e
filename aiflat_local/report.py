"""What a person checks in thirty seconds: ``overlay.png`` and ``report.html``.

``overlay.png`` is the reference, stretched to 8 bits, with the detected mask's
outline in red and the soft mask's outer edge (where the flat stops being
exactly 1.0) in yellow. ``report.html`` shows it beside the flat and the
calibrated reference, with the counts and provenance from ``report.json``.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

RED = np.array([255, 40, 40], dtype=np.uint8)
YELLOW = np.array([255, 220, 0], dtype=np.uint8)


def stretch(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Linear percentile stretch of a 2-D image to uint8 (NaNs become 0)."""
    finite = np.isfinite(image)
    if not finite.any():
        return np.zeros(image.shape, dtype=np.uint8)
    lo, hi = np.percentile(image[finite], [low, high])
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.clip((np.where(finite, image, lo) - lo) * scale, 0, 255)
    return out.astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """One-pixel inner outline of a boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay(reference: np.ndarray, dust_mask: np.ndarray, soft_mask: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 overlay: stretched reference, red mask outline, yellow soft-mask edge."""
    gray = stretch(reference)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    if soft_mask is not None:
        rgb[outline(soft_mask > 0)] = YELLOW
    rgb[outline(dust_mask)] = RED
    return rgb


def flat_view(flat: np.ndarray, span: float = 0.1) -> np.ndarray:
    """Grayscale uint8 view of a flat: 1.0 -> mid-grey, +-span -> white/black."""
    return np.clip(127.5 + (flat - 1.0) * (127.5 / span), 0, 255).astype(np.uint8)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:300]
    return str(value)


def _table(rows: dict[str, Any]) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def render_html(report: dict[str, Any], images: dict[str, str]) -> str:
    """HTML page for a run: headline numbers, images (relative paths), objects, provenance."""
    flat = report.get("flat", {})
    mask = report.get("mask", {})
    headline = {
        "input": report.get("input", {}).get("path"),
        "frames used": report.get("reference", {}).get("n_frames_used"),
        "masker": mask.get("backend"),
        "dust objects": mask.get("n_objects"),
        "dust pixels": mask.get("n_pixels"),
        "inpainter": report.get("inpaint", {}).get("backend"),
        "flat pixels exactly 1.0": flat.get("fraction_exactly_one"),
        "flat range": f"{flat.get('flat_min', float('nan')):.4f} .. {flat.get('flat_max', float('nan')):.4f}",
        "guarded divisions": flat.get("n_guarded"),
        "gain bounded (low / high)": f"{flat.get('n_bounded_low')} / {flat.get('n_bounded_high')}",
        "calibration clipped (high / low)": (
            f"{report.get('calibration', {}).get('n_clipped_high')} / "
            f"{report.get('calibration', {}).get('n_clipped_low')}"
        ),
        "total time (s)": report.get("timings_s", {}).get("total"),
    }
    figures = "".join(
        f'<figure><a href="{html.escape(src)}"><img src="{html.escape(src)}" alt="{html.escape(cap)}"></a>'
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        for cap, src in images.items()
    )
    objects = mask.get("objects", [])[:200]
    obj_rows = ""
    if objects:
        keys = [k for k in ("label", "y", "x", "area", "depth") if k in objects[0]]
        head = "".join(f"<th>{k}</th>" for k in keys)
        obj_rows = "<h2>Dust objects</h2><table><tr>" + head + "</tr>" + "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(o.get(k)))}</td>" for k in keys) + "</tr>"
            for o in objects
        ) + "</table>"
    warnings_html = "".join(f"<li>{html.escape(w)}</li>" for w in report.get("warnings", []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>aiflat-local report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; background: #111; color: #ddd; }}
table {{ border-collapse: collapse; margin-bottom: 1em; }}
th, td {{ border: 1px solid #444; padding: 2px 8px; text-align: left; font-size: 0.9em; }}
figure {{ display: inline-block; margin: 0.5em; vertical-align: top; }}
img {{ max-width: 46vw; image-rendering: pixelated; border: 1px solid #444; }}
a {{ color: #9cf; }}
</style></head><body>
<h1>aiflat-local report</h1>
<p>Red: the detected dust mask's outline. Yellow: the edge of the soft mask; outside it the flat
is exactly 1.0 and no pixel of the video changes. Check that every red outline sits on a dust
shadow and that no sunspot, pore or filament is outlined.</p>
{_table(headline)}
{"<h2>Warnings</h2><ul>" + warnings_html + "</ul>" if warnings_html else ""}
{figures}
{obj_rows}
<h2>Provenance</h2>
<pre>{html.escape(json.dumps({k: report.get(k) for k in ("versions", "parameters", "input", "reference", "weights")}, indent=2, default=str))}</pre>
</body></html>
"""


def write_report_files(directory: Path, report: dict[str, Any], reference: np.ndarray,
                       dust_mask: np.ndarray, soft: np.ndarray, flat: np.ndarray) -> list[str]:
    """Write ``overlay.png``, ``flat.png``, ``corrected.png`` and ``report.html`` into *directory*.

    Returns the file names written. The corrected view is ``reference / flat``
    with the same stretch as the overlay, so residual shadows are visible.
    """
    from .io import write_png

    directory = Path(directory)
    write_png(directory / "overlay.png", overlay(reference, dust_mask, soft))
    write_png(directory / "flat.png", flat_view(flat))
    finite = np.isfinite(reference)
    lo, hi = np.percentile(reference[finite], [0.5, 99.5]) if finite.any() else (0.0, 1.0)
    corrected = reference / flat
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    write_png(directory / "corrected.png", np.clip((corrected - lo) * scale, 0, 255).astype(np.uint8))
    images = {
        "reference with mask outline (overlay.png)": "overlay.png",
        "reference divided by the flat (corrected.png)": "corrected.png",
        "flat, 1.0 = grey, +-10 % = white/black (flat.png)": "flat.png",
    }
    (directory / "report.html").write_text(render_html(report, images), encoding="utf-8")
    return ["overlay.png", "flat.png", "corrected.png", "report.html"]

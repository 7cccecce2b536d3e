"""The whole pipeline as one function: input -> reference -> mask -> inpaint -> flat -> calibrated.

:func:`run` is what ``aiflat-local run`` calls. Every output is written into a
hidden staging folder inside OUTDIR and moved into place only when all of them
are complete, so a failed run leaves OUTDIR as it was (apart from an empty
staging folder being removed).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__
from .errors import InputError, OutputError
from .flat import FlatParams, FlatResult, build_flat, inpaint_region
from .io import check_writable_dir, detect_format, read_image, read_mask, write_fits, write_mask, write_tiff, write_xisf

OUTPUTS_VIDEO = [
    "reference.fits", "mask.png", "mask_soft.fits", "inpainted.fits", "flat.fits", "flat.tif",
    "flat.xisf", "calibrated.ser", "report.json", "report.html", "overlay.png",
]


@dataclass
class RunOptions:
    """Everything that shapes a run (recorded in ``report.json``)."""

    masker: str = "auto"  # "auto": "motion" for a video, "dustnet" (the shipped learned model) for a single image
    flat_method: str = "auto"  # "auto" | "motion" | "inpaint" (see run())
    motion_frames: int = 48  # frames used by the motion flat (evenly spaced)
    masker_options: dict[str, Any] = field(default_factory=dict)
    inpainter: str = "harmonic"
    inpainter_options: dict[str, Any] = field(default_factory=dict)
    mask_path: str | None = None  # use this mask instead of running a masker
    flat: FlatParams = field(default_factory=FlatParams)  # the inpainted-median route (original tool: 10 px, sigma 3)
    motion_flat_params: FlatParams = field(default_factory=lambda: FlatParams(expand_px=3.0, sigma_px=1.5))
    frame_start: int = 0
    frame_stop: int | None = None
    frame_step: int = 1
    max_memory_mb: int = 256
    device: str = "cpu"
    dtype: str | None = None  # model precision for learned backends: float32 | float16 (CUDA) | None = backend default
    calibrate: bool = True
    tiff_scale: str = "half"  # "half": unity stored at 0.5 (float32); "unity16": 65535 = 1.0
    byteorder: str = "auto"
    progress: bool = True


def versions() -> dict[str, str]:
    """Versions of the software that shaped an output (provenance)."""
    import astropy
    import scipy

    return {
        "aiflat_local": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "astropy": astropy.__version__,
        "platform": platform.platform(),
    }


def to_mono(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(H, W)`` channel mean (float32); 2-D images unchanged."""
    return image.mean(axis=2, dtype=np.float64).astype(np.float32) if image.ndim == 3 else image


def masker_reference(raw_reference: np.ndarray, reader: Any = None) -> np.ndarray:
    """The reference a masker sees: mono (:func:`to_mono`), a Bayer/CMY mosaic balanced per CFA site."""
    from .reference import balance_cfa

    reference = to_mono(raw_reference)
    if reader is not None and reader.is_mosaic:
        reference = balance_cfa(reference, reader.header.color_id)
    return reference


class _Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def step(self, name: str):
        t = time.perf_counter()
        yield
        self.times[name] = round(time.perf_counter() - t, 3)

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 3)


def build_backends(options: RunOptions) -> tuple[Any, Any]:
    """Build the masker (None with a mask file) and the inpainter up front.

    Learned backends check their weights when built, so a missing or corrupted
    model is reported before any long computation starts.
    """
    from .inpaint import INPAINTERS
    from .masks import MASKERS

    masker = None
    if not options.mask_path:
        masker = MASKERS.create(options.masker, **backend_options(MASKERS, options.masker, options.masker_options, options))
    inpainter = INPAINTERS.create(
        options.inpainter, **backend_options(INPAINTERS, options.inpainter, options.inpainter_options, options))
    return masker, inpainter


def compute_mask(reference: np.ndarray, options: RunOptions, frames: Any = None, masker: Any = None):
    """Run the chosen masker (or read ``options.mask_path``) -> (bool mask, report dict)."""
    from .masks import MASKERS

    if options.mask_path:
        mask = read_mask(options.mask_path)
        if mask.shape != reference.shape:
            raise InputError(
                f"{options.mask_path}: mask is {mask.shape[1]} x {mask.shape[0]} but the image is "
                f"{reference.shape[1]} x {reference.shape[0]}"
            )
        return mask, {"backend": "file", "params": {"path": str(options.mask_path)}, "objects": []}
    if masker is None:
        masker = MASKERS.create(options.masker, **backend_options(MASKERS, options.masker, options.masker_options, options))
    result = masker(reference, frames=frames)
    return result.binary, {"backend": options.masker, "params": result.params, "objects": result.objects}


def backend_options(registry, name: str, given: dict[str, Any], options: RunOptions) -> dict[str, Any]:
    """Options for a backend: what the user gave, plus ``device`` for backends that run models."""
    out = dict(given)
    if registry.accepts(name, "device"):
        out.setdefault("device", options.device)
    if options.dtype is not None and registry.accepts(name, "dtype"):
        out.setdefault("dtype", options.dtype)
    if registry.accepts(name, "progress"):
        out.setdefault("progress", options.progress)
    return out


def check_options(input_path: Path, outdir: Path, options: RunOptions) -> None:
    """Fail fast, before any work: unknown backends, a missing mask file, an output onto the input."""
    from .inpaint import INPAINTERS
    from .masks import MASKERS

    if options.mask_path is None:
        MASKERS.info(options.masker)
    elif not Path(options.mask_path).is_file():
        raise InputError(f"{options.mask_path}: no such mask file")
    INPAINTERS.info(options.inpainter)
    target_names = OUTPUTS_VIDEO + ["calibrated.fits", "flat.png", "corrected.png"]
    for name in target_names:
        if (outdir / name).exists() and (outdir / name).resolve() == input_path.resolve():
            raise OutputError(f"refusing to overwrite the input file {input_path} (choose another output directory)")


def check_mask(mask: np.ndarray, warnings: list[str]) -> None:
    """Refuse a mask that covers everything; note one that finds nothing."""
    if mask.all():
        raise InputError("the dust mask covers the whole image: there is no clean pixel to build a flat from")
    if not mask.any():
        warnings.append("no dust found: the flat is exactly 1.0 everywhere")


def make_flat(reference: np.ndarray, mask: np.ndarray, options: RunOptions,
              inpainter: Any = None) -> tuple[FlatResult, np.ndarray, dict]:
    """Inpaint the soft mask's support and build the flat -> (flat result, inpainted, inpaint report)."""
    from .inpaint import INPAINTERS

    region = inpaint_region(mask, options.flat)
    if region.all():
        raise InputError("the expanded dust mask covers the whole image: nothing to inpaint from")
    if region.any():
        if inpainter is None:
            inpainter = INPAINTERS.create(
                options.inpainter, **backend_options(INPAINTERS, options.inpainter, options.inpainter_options, options))
        result = inpainter(reference, region)
        inpainted, info = result.image, {"backend": options.inpainter, "params": result.params}
        if result.spread is not None:
            info["spread"] = result.spread
    else:
        inpainted, info = reference.copy(), {"backend": options.inpainter, "params": {}, "skipped": "empty mask"}
    flat = build_flat(reference, mask, inpainted=inpainted, params=options.flat)
    return flat, inpainted, info


def motion_for(reader: Any, masker: Any, options: RunOptions, log: Callable[[str], None]):
    """The motion flat of a video: the motion masker's own solve, or a new one."""
    motion = getattr(masker, "motion", None)
    if motion is not None:
        return motion
    from .motion import motion_flat

    log(f"motion flat from up to {options.motion_frames} frames")
    return motion_flat(reader, max_frames=options.motion_frames, device=options.device, progress=options.progress)


def motion_route_flat(reference: np.ndarray, mask: np.ndarray, motion: Any, inpaint_flat: FlatResult,
                      options: RunOptions) -> FlatResult:
    """The flat from the motion gain, blended with the inpainting route where motion says little.

    Inside the motion support the gain is the motion solve's; outside it (the
    frame border, the limb) the inpainted-median ratio; the two meet smoothly
    (:func:`aiflat_local.motion.blend_gains`). The flat builder's rules hold
    as for any gain: exactly 1.0 outside the soft mask. The motion mask already
    reaches out to where the gain is 0.2 % from 1, and the motion knows the
    gain's noise, so the soft mask is not a fixed dilation inside the motion
    support: within ``options.motion_flat_params.expand_px`` (3 px) of the
    mask it follows the significance of the gain's departure from 1
    (:func:`aiflat_local.motion.motion_soft_mask`: weight 0 below 2 sigma,
    1 from 4 sigma), so pixels whose gain is indistinguishable from 1 stay
    exactly 1.0. Outside the support (inpainted gain) it is the mask expanded
    by ``expand_px`` and feathered by ``sigma_px`` (3 px, 1.5 px).
    """
    from .flat import soft_mask
    from .motion import blend_gains, motion_soft_mask

    params = options.motion_flat_params
    gain = blend_gains(motion.gain, motion.support, inpaint_flat.gain)
    outside = soft_mask(mask, params.expand_px, params.sigma_px, params.weight_floor)
    weight = motion_soft_mask(motion, mask, reach_px=params.expand_px, outside=outside)
    result = build_flat(reference, mask, gain=gain, params=params, weight=weight)
    result.stats["soft_mask"] = ("motion significance (z 2-4) within expand_px of the mask inside the motion "
                                 "support; expand_px + sigma_px feather outside it")
    result.stats["gain_source"] = "motion (blended with reference/inpainted outside the motion support)"
    result.stats["motion_support_fraction"] = float(np.mean(motion.support))
    return result


def flat_for_tiff(flat: np.ndarray, tiff_scale: str) -> tuple[np.ndarray, dict[str, Any]]:
    """The flat as stored in ``flat.tif``: float32 with unity 0.5, or uint16 with 65535 = 1.0."""
    if tiff_scale == "half":
        return (flat * np.float32(0.5)).astype(np.float32), {"unity": 0.5, "dtype": "float32"}
    if tiff_scale == "unity16":
        over = int(np.count_nonzero(flat > 1.0))
        data = np.round(np.clip(flat, 0.0, 1.0) * 65535.0).astype(np.uint16)
        return data, {"unity": 65535, "dtype": "uint16", "n_clipped_above_unity": over}
    raise ValueError(f"tiff_scale must be 'half' or 'unity16', not {tiff_scale!r}")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def write_json(path: Path, data: dict[str, Any]) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default), encoding="utf-8")


def run(input_path: str | os.PathLike, outdir: str | os.PathLike, options: RunOptions | None = None,
        log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run the whole pipeline on a SER video or a single image; returns the report dict.

    Outputs (see DESIGN.md): reference.fits, mask.png, mask_soft.fits,
    inpainted.fits, flat.fits, flat.tif, flat.xisf, calibrated.ser (video) or
    calibrated.fits (image), report.json, report.html, overlay.png (+ flat.png,
    corrected.png used by the HTML page).
    """
    from .calibrate import calibrate_image, calibrate_ser
    from .reference import temporal_median
    from .io.ser import SerReader
    from .report import write_report_files

    options = options or RunOptions()
    input_path = Path(input_path)
    outdir = Path(outdir)
    fmt = detect_format(input_path)
    if options.flat_method not in ("auto", "motion", "inpaint"):
        raise InputError(f"flat method must be auto, motion or inpaint, not {options.flat_method!r}")
    if options.masker == "auto":
        options = replace(options, masker="motion" if fmt == "ser" else "dustnet")
    if options.masker == "motion":
        options.masker_options.setdefault("max_frames", options.motion_frames)
    check_options(input_path, outdir, options)
    check_writable_dir(outdir)
    timer = _Timer()
    warnings: list[str] = []
    report: dict[str, Any] = {
        "tool": "aiflat-local",
        "versions": versions(),
        "parameters": json.loads(json.dumps(asdict(options), default=_json_default)),
        "warnings": warnings,
        "weights": {},
    }

    with timer.step("load_backends"):
        masker, inpainter = build_backends(options)
    reader = None
    try:
        with timer.step("reference"):
            if fmt == "ser":
                reader = SerReader(input_path, byteorder=options.byteorder)
                warnings.extend(reader.warnings)
                log(f"reference: temporal median of {reader.n_frames} frames "
                    f"({reader.width} x {reader.height}, {reader.header.color_name}, {reader.dtype})")
                raw_reference = temporal_median(
                    reader, start=options.frame_start, stop=options.frame_stop, step=options.frame_step,
                    max_memory_mb=options.max_memory_mb, progress=options.progress,
                )
                n_used = len(range(*slice(options.frame_start, options.frame_stop, options.frame_step).indices(reader.n_frames)))
                report["input"] = {
                    "path": str(input_path), "format": "ser", "width": reader.width, "height": reader.height,
                    "n_frames": reader.n_frames, "color": reader.header.color_name, "dtype": str(reader.dtype),
                    "byteorder": reader.byteorder, "timestamps": reader.timestamps is not None,
                }
                report["reference"] = {"method": "temporal median (exact)", "n_frames_used": n_used,
                                       "start": options.frame_start, "stop": options.frame_stop,
                                       "step": options.frame_step}
            else:
                raw_reference, info = read_image(input_path)
                report["input"] = {"path": str(input_path), "format": fmt, "width": raw_reference.shape[1],
                                   "height": raw_reference.shape[0], "dtype": info.dtype,
                                   "channels": 1 if raw_reference.ndim == 2 else 3}
                report["reference"] = {"method": "the input image itself", "n_frames_used": 1}
            reference = masker_reference(raw_reference, reader)
            if reader is not None and reader.is_mosaic:
                report["reference"]["cfa_balanced"] = True

        log(f"mask: {options.masker if not options.mask_path else options.mask_path}")
        with timer.step("mask"):
            mask, mask_info = compute_mask(reference, options, frames=reader, masker=masker)
            check_mask(mask, warnings)
        from scipy import ndimage

        n_objects = int(ndimage.label(mask, structure=np.ones((3, 3)))[1])
        report["mask"] = {**mask_info, "n_pixels": int(mask.sum()), "n_objects": n_objects,
                          "fraction": float(mask.mean())}

        log(f"inpaint + flat: {options.inpainter}")
        with timer.step("inpaint_and_flat"):
            flat, inpainted, inpaint_info = make_flat(reference, mask, options, inpainter=inpainter)
        report["inpaint"] = inpaint_info

        aligned = None
        if reader is not None and options.flat_method != "inpaint":
            with timer.step("motion_flat"):
                motion = motion_for(reader, masker, options, log)
                report["motion"] = motion.to_dict(per_frame=True) if motion is not None else {
                    "used": False, "reason": "not computed"}
                if motion is not None and motion.used:
                    flat = motion_route_flat(reference, mask, motion, flat, options)
                    log(f"flat from motion: {report['motion'].get('reason', '')}")
                else:
                    reason = report["motion"]["reason"]
                    warnings.append(f"motion flat not used ({reason}); the flat comes from the inpainted median")
                    if options.flat_method == "motion":
                        raise InputError(f"--flat-method motion: {reason}")
            if motion is not None and motion.used:
                with timer.step("aligned_reference"):
                    from .motion import aligned_median

                    aligned = aligned_median(reader, motion.registration, at="mean",
                                             max_memory_mb=options.max_memory_mb, progress=options.progress)
        else:
            report["motion"] = {"used": False, "reason": "single image" if reader is None else "--flat-method inpaint"}
        report["flat"] = flat.stats

        staging = Path(tempfile.mkdtemp(prefix=".aiflat-partial-", dir=outdir))
        try:
            with timer.step("calibrate"):
                if options.calibrate:
                    if reader is not None:
                        log("calibrate: dividing every frame by the flat")
                        stats = calibrate_ser(input_path, flat.flat, staging / "calibrated.ser",
                                              progress=options.progress)
                    else:
                        image, info = read_image(input_path)
                        out, stats = calibrate_image(image, flat.flat, dtype=np.dtype(info.dtype))
                        write_fits(staging / "calibrated.fits", out, _fits_provenance(report))
                    report["calibration"] = stats.to_dict()
            with timer.step("write"):
                _write_outputs(staging, report, raw_reference, reference, mask, flat, inpainted, options)
                if aligned is not None:
                    write_fits(staging / "reference_aligned.fits", aligned,
                               {**_fits_provenance(report), "IMAGETYP": "Sun-aligned reference"})
                report["timings_s"] = {**timer.times, "total": timer.total()}
                write_report_files(staging, report, reference, mask, flat.soft_mask, flat.flat)
                report["outputs"] = sorted(p.name for p in staging.iterdir()) + ["report.json"]
                write_json(staging / "report.json", report)
            protect = {input_path.resolve()}
            for p in sorted(staging.iterdir()):
                target = outdir / p.name
                if target.resolve() in protect:
                    raise OutputError(f"refusing to overwrite the input file {target}")
            for p in sorted(staging.iterdir()):
                os.replace(p, outdir / p.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        if reader is not None:
            reader.close()
    return report


def _fits_provenance(report: dict[str, Any]) -> dict[str, Any]:
    mask = report.get("mask", {})
    return {
        "CREATOR": f"aiflat-local {__version__}",
        "MASKER": mask.get("backend", ""),
        "INPAINT": report.get("inpaint", {}).get("backend", ""),
        "EXPANDPX": report.get("flat", {}).get("params", report["parameters"]["flat"])["expand_px"],
        "SIGMAPX": report.get("flat", {}).get("params", report["parameters"]["flat"])["sigma_px"],
        "NFRAMES": report.get("reference", {}).get("n_frames_used", 1),
    }


def _write_outputs(staging: Path, report: dict[str, Any], raw_reference: np.ndarray, reference: np.ndarray,
                   mask: np.ndarray, flat: FlatResult, inpainted: np.ndarray, options: RunOptions) -> None:
    prov = _fits_provenance(report)
    write_fits(staging / "reference.fits", raw_reference, {**prov, "IMAGETYP": "reference"})
    write_mask(staging / "mask.png", mask)
    write_fits(staging / "mask_soft.fits", flat.soft_mask, {**prov, "IMAGETYP": "soft mask"})
    write_fits(staging / "inpainted.fits", inpainted, {**prov, "IMAGETYP": "inpainted"})
    spread = report.get("inpaint", {}).pop("spread", None)
    if spread is not None:
        write_fits(staging / "inpaint_spread.fits", spread, {**prov, "IMAGETYP": "inpaint spread"})
    write_fits(staging / "flat.fits", flat.flat, {**prov, "IMAGETYP": "flat", "UNITY": 1.0})
    tif, tif_info = flat_for_tiff(flat.flat, options.tiff_scale)
    write_tiff(staging / "flat.tif", tif,
               description=f"aiflat-local flat; unity = {tif_info['unity']}; top row first")
    write_xisf(staging / "flat.xisf", (flat.flat * np.float32(0.5)).astype(np.float32),
               properties={**prov, "UNITY": 0.5})
    report["flat_files"] = {
        "flat.fits": {"dtype": "float32", "unity": 1.0, "row_order": "BOTTOM-UP (FITS convention)"},
        "flat.tif": {**tif_info, "row_order": "top row first"},
        "flat.xisf": {"dtype": "float32", "unity": 0.5, "row_order": "top row first"},
    }


def default_log(message: str) -> None:
    print(message, file=sys.stderr)

"""The ``dustnet`` masker: a small learned dust segmenter that ships with aiflat-local.

A compact U-Net (about 107 k parameters, 0.44 MB of weights in
``weights/dustnet/``) trained only on the project's physical simulator by
:mod:`aiflat_local.train`; no download, no network. The reference image is
normalised by its own large-scale background (:func:`~aiflat_local.masks._dustnet_model.prepare_input`),
so any units, exposure, bit depth or JPEG-decoded image works; the network
runs on tiles that overlap and are blended (no seams), on the CPU or a CUDA
GPU, in float32 (or float16 on a GPU). torch and safetensors are imported only
when the masker is built.

Objects are detected where the probability reaches ``threshold``; each
object's extent is then narrowed to where the probability reaches
``extent_threshold`` (:func:`extent_mask`; the network's boundary is a little
generous). With the video's frames, mask objects whose shape moves with the
Sun (pores and small sunspots, which in one median image can look exactly
like dust) are dropped (:func:`motion_filter`; unless the video's motion flat
shows a sensor-fixed shadow under them, :func:`sensor_fixed`: tiny deep dust
can fail the shape test), and the extent of each
remaining object is measured from the video's motion flat
(:func:`refine_with_motion`, :func:`aiflat_local.motion.motion_flat`: the eye
says where, physics says how far).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import BackendError, InputError, WeightsError
from .base import MASKERS, MaskResult

_EIGHT = np.ones((3, 3), dtype=bool)
_DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32",
           "float16": "float16", "fp16": "float16", "half": "float16"}
KIND = "dustnet"


def _check_device(device: str) -> str:
    device = str(device).lower()
    if device == "cpu":
        return device
    if not (device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise BackendError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    import torch

    if not torch.cuda.is_available():
        raise BackendError(f"device {device} requested but torch sees no CUDA device; use --device cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise BackendError(f"device {device} does not exist (torch sees {torch.cuda.device_count()} CUDA device(s))")
    return device


def _check_dtype(dtype: str | None, device: str) -> str:
    name = _DTYPES.get(str(dtype or "float32").lower().replace("torch.", ""))
    if name is None:
        raise BackendError(f"unknown dtype {dtype!r} for dustnet; use float32 or float16")
    if name == "float16" and not device.startswith("cuda"):
        raise BackendError("dustnet runs in float16 only on a CUDA device; on the CPU use float32")
    return name


@MASKERS.register("dustnet", "small U-Net trained on the simulator; weights shipped in weights/dustnet",
                  requires=("torch", "safetensors"), needs_weights=True)
class DustNetMasker:
    """Learned dust segmenter (see the module documentation).

    Parameters
    ----------
    model : str
        A model name in the weights store (``"dustnet"``, the shipped model:
        loaded through :class:`~aiflat_local.weights.WeightStore`, checksums
        verified) or the path of a directory holding ``model.safetensors`` and
        ``card.json`` (e.g. written by ``python -m aiflat_local.train``).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    dtype : str
        ``"float32"``, or ``"float16"`` on CUDA only.
    threshold : float or None
        Dust where the predicted probability is at least this; None: the
        model card's value (0.5 for the shipped model).
    tile, overlap : int
        Tile size and overlap (px) of the tiled inference; ``tile <= 0`` runs
        the whole image at once (needs about 200 bytes of memory per pixel).
    weights_dir : str or None
        Weights store directory (default: see :func:`~aiflat_local.weights.default_directory`).
    motion_frames : int
        When the frames are given, up to this many (evenly spaced) are used
        to drop mask objects that move with the Sun (pores, small sunspots:
        in one median image they can look exactly like dust); 0 = never.
    max_sun_coupling : float
        An object whose shape follows the Sun's motion by more than this
        (0 = fixed to the sensor, 1 = moves with the Sun) is dropped. 0.85
        was chosen on simulator seeds 100-111 (not the held-out ones):
        dust deeper than 10 % measured 0.83 at most, pores and sunspots 0.82
        at least and mostly above 1.
    motion_min_px : float
        Below this rms motion of the Sun (px) the frames cannot tell, and
        nothing is dropped nor refined (said in ``params["motion"]``).
    extent_threshold : float or None
        Each detected object keeps only its pixels whose probability is at
        least this (an object with none keeps the pixels within 1 logit of
        its peak, so no detection is lost); None or a value <= *threshold*:
        the detection as it is. 0.95 was chosen on validation seeds 100-105
        (not the held-out ones): from the median alone, IoU with dust deeper
        than 10 % 0.615 -> 0.661 at threshold 0.8, recall and dark features
        unchanged (a side effect: the real case's IoU with its cloud mask
        rose from 0.164 to 0.220, recall unchanged).
    refine_with_frames : bool
        With the frames (and enough motion), measure each kept object's
        extent from the video's motion flat (:func:`refine_with_motion`): the
        pixels within *refine_grow_px* of the detection's core (its pixels
        above *extent_threshold*) where the gain departs from 1 by more than
        *refine_depth* (darker, or the bright rim), connected to the detection. The motion flat is solved here from
        *refine_frames* frames (a few seconds per megapixel), unless one is
        given to the call (``motion=``; the motion masker passes its own). On
        validation seeds 100-105 with the frames: IoU with dust deeper than
        10 % 0.722 (detection) -> 0.876, recall 0.982 and dark features
        masked 0.021 unchanged (measuring the extent from a 16-frame median
        ratio instead reached 0.789: its residual solar texture is about 1 %).
    refine_frames : int
        Frames for the motion flat solved for the refinement (evenly spaced).
    refine_depth : float
        Attenuation (fraction, 0.01 = 1 %) from which a pixel is dust: the
        same 1 % rule that defines a shadow's true extent in the simulator.
    refine_grow_px : int
        How far (px, city-block distance) the motion flat may grow an object
        beyond its core (2 was best on the validation seeds: IoU 0.876,
        against 0.862 for 1 and 0.852 for 3; a depth of 0.8 % gave 0.826).
    """

    name = "dustnet"

    def __init__(self, model: str = "dustnet", device: str = "cpu", dtype: str = "float32",
                 threshold: float | None = None, tile: int = 512, overlap: int = 96,
                 weights_dir: str | None = None, motion_frames: int = 16,
                 max_sun_coupling: float = 0.85, motion_min_px: float = 0.7,
                 extent_threshold: float | None = 0.95, refine_with_frames: bool = True,
                 refine_depth: float = 0.01, refine_grow_px: int = 2, refine_frames: int = 24) -> None:
        from . import _dustnet_model as dm

        self.device = _check_device(device)
        self.dtype = _check_dtype(dtype, self.device)
        if threshold is not None and not 0.0 < float(threshold) < 1.0:
            raise BackendError(f"dustnet threshold must be in (0, 1), got {threshold}")
        if int(overlap) < 0:
            raise BackendError(f"dustnet overlap must be >= 0, got {overlap}")
        self.tile, self.overlap = int(tile), int(overlap)
        self.motion_frames, self.max_sun_coupling = int(motion_frames), float(max_sun_coupling)
        self.motion_min_px = float(motion_min_px)
        if extent_threshold is not None and not 0.0 < float(extent_threshold) < 1.0:
            raise BackendError(f"dustnet extent_threshold must be in (0, 1) or None, got {extent_threshold}")
        if not 0.0 < float(refine_depth) < 1.0:
            raise BackendError(f"dustnet refine_depth must be in (0, 1), got {refine_depth}")
        if int(refine_grow_px) < 0:
            raise BackendError(f"dustnet refine_grow_px must be >= 0, got {refine_grow_px}")
        self.extent_threshold = None if extent_threshold is None else float(extent_threshold)
        self.refine_with_frames, self.refine_depth = bool(refine_with_frames), float(refine_depth)
        self.refine_grow_px = int(refine_grow_px)
        if int(refine_frames) < 4:
            raise BackendError(f"dustnet refine_frames must be >= 4, got {refine_frames}")
        self.refine_frames = int(refine_frames)
        self.model_name = str(model)
        self.directory, self.sha256 = self._locate(self.model_name, weights_dir)
        self.card = self._read_card(self.directory)
        self.net = dm.load_model(self.directory, device=self.device, dtype=self.dtype)
        self.threshold = float(threshold if threshold is not None else self.card.get("threshold", 0.5))

    # ------------------------------------------------------------------ loading
    @staticmethod
    def _locate(model: str, weights_dir: str | None) -> tuple[Path, str]:
        """Model directory and the sha256 of its weights file (verified against the store when named)."""
        from ..weights import SHIPPED_DIRECTORY, WeightStore, sha256_file
        from ._dustnet_model import WEIGHTS_FILE

        path = Path(model).expanduser()
        if path.is_dir():
            weights = path / WEIGHTS_FILE
            if not weights.is_file():
                raise WeightsError(f"{path}: no {WEIGHTS_FILE} in this directory")
            return path, sha256_file(weights)
        if any(sep in model for sep in ("/", "\\")) or model.endswith(".safetensors"):
            raise WeightsError(f"{model}: no such model directory")
        store = WeightStore(weights_dir)
        if weights_dir is None and (model not in store.models or store.status(model) != "present"):
            # a user store ($AIFLAT_WEIGHTS, ./weights) without the shipped model's files: use the shipped one
            shipped = WeightStore(SHIPPED_DIRECTORY)
            if model in shipped.models and shipped.status(model) == "present":
                store = shipped
        entry = store.entry(model)
        if entry.get("kind") != KIND:
            raise WeightsError(f"model {model!r} is a {entry.get('kind')!r} model, not a {KIND} model")
        directory = store.require(model, verify=True)
        pinned = entry.get("files", {}).get(WEIGHTS_FILE)
        return directory, pinned or sha256_file(directory / WEIGHTS_FILE)

    @staticmethod
    def _read_card(directory: Path) -> dict[str, Any]:
        import json

        from ._dustnet_model import CARD_FILE

        path = directory / CARD_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise WeightsError(f"{path}: unreadable model card ({exc})") from None

    def params(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_name, "path": str(self.directory),
                "sha256": self.sha256, "device": self.device, "dtype": self.dtype,
                "threshold": self.threshold, "tile": self.tile, "overlap": self.overlap,
                "motion_frames": self.motion_frames, "max_sun_coupling": self.max_sun_coupling,
                "motion_min_px": self.motion_min_px, "extent_threshold": self.extent_threshold,
                "refine_with_frames": self.refine_with_frames, "refine_depth": self.refine_depth,
                "refine_grow_px": self.refine_grow_px, "refine_frames": self.refine_frames,
                "architecture": self.net.config.to_dict()}

    # ------------------------------------------------------------------ inference
    def probability(self, reference: np.ndarray) -> np.ndarray:
        """Dust probability per pixel, float32 ``(H, W)`` in [0, 1]."""
        logits = self.logits(reference)
        return (1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))).astype(np.float32)

    def logits(self, reference: np.ndarray) -> np.ndarray:
        """The network's dust logits for *reference*, float32 ``(H, W)`` (tiled, blended)."""
        from ._dustnet_model import predict_logits, prepare_input

        img = np.asarray(reference)
        if img.ndim == 3 and img.shape[2] in (3, 4):
            img = img[..., :3].mean(axis=2)
        if img.ndim != 2:
            raise InputError(f"dustnet needs a 2-D image, got shape {img.shape}")
        if min(img.shape) < 8:
            raise InputError(f"image too small for dust detection: {img.shape[1]} x {img.shape[0]}")
        if not np.isfinite(img).any():
            raise InputError("the image has no finite pixel")
        inputs = prepare_input(img, self.net.config.background_px)
        return predict_logits(self.net, inputs, tile=self.tile, overlap=self.overlap,
                              device=self.device, dtype=self.dtype)

    def __call__(self, reference: np.ndarray, *, frames: Any = None, motion: Any = None) -> MaskResult:
        """Segment the dust in *reference*.

        Parameters
        ----------
        reference : numpy.ndarray
            ``(H, W)`` temporal median (or single image), any linear units,
            sensor orientation; RGB is averaged.
        frames : optional
            The video's frames (a :class:`~aiflat_local.io.ser.SerReader`, or an
            array or list of ``(H, W)`` frames): mask objects that move with
            the Sun are dropped (see :func:`motion_filter`) and the extent of
            the others is measured from the motion flat (see *refine_with_frames*).
        motion : aiflat_local.motion.MotionFlat, optional
            The motion flat of these frames, when already solved (not solved again).

        Returns
        -------
        MaskResult
            ``mask`` float32 0/1 (1 = dust: objects detected at ``threshold``,
            their extent narrowed by ``extent_threshold`` or, with frames,
            measured by :func:`refine_with_motion`);
            ``objects`` (8-connected): ``label``, ``y``, ``x`` (centroid, px),
            ``area``, ``diameter`` (equivalent, px), ``score`` (peak
            probability), ``bbox`` ``[y0, x0, y1, x1]`` (and ``sun_coupling``
            with frames: the highest of the detections it came from);
            ``params`` with the model, its sha256, device, dtype, thresholds,
            tiling, the motion check, the refinement and the run time.
        """
        t0 = time.perf_counter()
        logits = self.logits(reference)
        cut = math.log(self.threshold / (1.0 - self.threshold))
        detected = logits >= cut
        labels, n = ndimage.label(detected, structure=_EIGHT)
        motion_info: dict[str, Any] = {"used": False}
        refine: dict[str, Any] = {"used": False}
        coupling: dict[int, float] = {}
        registration = None
        if frames is not None and self.motion_frames > 0 and n:
            registration, motion_info = register_frames(frames, labels, n_frames=self.motion_frames,
                                                        min_rms_px=self.motion_min_px)
        usable_motion = None  # the video's motion flat (given, or solved when the frames move), when wanted
        if self.refine_with_frames and n:
            if motion is None and registration is not None:
                from ..motion import motion_flat

                motion = motion_flat(frames, max_frames=self.refine_frames, device=self.device)
            if motion is not None and motion.used and motion.gain.shape == labels.shape:
                usable_motion = motion
            elif motion is not None:
                refine = {"used": False, "note": motion.reason if not motion.used else "motion flat of another shape"}
        if registration is not None:
            keep, coupling, motion_info = motion_filter(labels, n, frames, n_frames=self.motion_frames,
                                                        max_coupling=self.max_sun_coupling,
                                                        min_rms_px=self.motion_min_px, sample=registration)
            if usable_motion is not None:  # the motion flat shows a sensor-fixed shadow: dust, whatever the shape test
                kept_back = sensor_fixed(labels, np.flatnonzero(~keep[1:]) + 1, usable_motion)
                keep[kept_back] = True
                motion_info["n_dropped"] -= len(kept_back)
                motion_info["n_kept_by_motion_flat"] = len(kept_back)
            labels = np.where(keep[labels], labels, 0)
        mask = labels > 0
        ext_cut = None
        if self.extent_threshold is not None and self.extent_threshold > self.threshold:
            ext_cut = math.log(self.extent_threshold / (1.0 - self.extent_threshold))
            mask = extent_mask(labels, logits, ext_cut)
        if usable_motion is not None and mask.any():
            mask, refine = refine_with_motion(labels, mask, usable_motion, depth=self.refine_depth,
                                              grow_px=self.refine_grow_px)
        objects = _objects(mask, logits)
        if coupling:  # each final object: the highest coupling of the detections it overlaps
            final, _ = ndimage.label(mask, structure=_EIGHT)
            both = (final > 0) & (labels > 0)
            per_object: dict[int, float] = {}
            for f_id, d_id in set(zip(final[both].tolist(), labels[both].tolist())):
                if d_id in coupling:
                    per_object[f_id] = max(coupling[d_id], per_object.get(f_id, -math.inf))
            for ob in objects:
                if ob["label"] in per_object:
                    ob["sun_coupling"] = round(float(per_object[ob["label"]]), 3)
        params = self.params()
        params.update(n_objects=len(objects), motion=motion_info, refine=refine,
                      seconds=round(time.perf_counter() - t0, 3))
        return MaskResult(mask.astype(np.float32), params, objects)


def extent_mask(labels: np.ndarray, logits: np.ndarray, cut: float) -> np.ndarray:
    """Each object of *labels* narrowed to its pixels with ``logits >= cut``; never emptied.

    An object without such a pixel keeps its pixels within 1 logit of its
    own peak. Returns a boolean ``(H, W)`` mask inside ``labels > 0``.
    """
    inside = labels > 0
    out = inside & (logits >= cut)
    n = int(labels.max()) if labels.size else 0
    if n == 0:
        return out
    ids = np.arange(1, n + 1)
    present = ndimage.maximum(inside, labels, index=ids).astype(bool)
    covered = ndimage.maximum(out, labels, index=ids).astype(bool)
    lost = ids[present & ~covered]
    if lost.size:
        peak = np.full(n + 1, np.inf, np.float32)
        peak[ids] = ndimage.maximum(logits, labels, index=ids)
        out |= inside & np.isin(labels, lost) & (logits >= peak[labels] - 1.0)
    return out


def _objects(mask: np.ndarray, logits: np.ndarray) -> list[dict[str, Any]]:
    labels, n = ndimage.label(mask, structure=_EIGHT)
    out: list[dict[str, Any]] = []
    if n == 0:
        return out
    peak = ndimage.maximum(logits, labels, index=np.arange(1, n + 1))
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        m = labels[sl] == k
        ys, xs = np.nonzero(m)
        area = int(m.sum())
        out.append({
            "label": k, "y": round(float(ys.mean() + sl[0].start), 2),
            "x": round(float(xs.mean() + sl[1].start), 2), "area": area,
            "diameter": round(2 * math.sqrt(area / math.pi), 2),
            "score": round(float(1.0 / (1.0 + math.exp(-float(np.clip(peak[k - 1], -60, 60))))), 4),
            "bbox": [int(sl[0].start), int(sl[1].start), int(sl[0].stop), int(sl[1].stop)],
        })
    return out


# --------------------------------------------------------------------------- motion evidence
def _sun_coupling(stack: np.ndarray, shifts: np.ndarray, support: np.ndarray, smooth_px: float) -> float:
    """How much of an object's shape moves with the Sun: ~0 fixed to the sensor, ~1 moving with the Sun.

    ``stack``: the frames around the object, brought to a common level;
    their median is the reference. If the object moved with the Sun, frame
    ``k`` would differ from the median by ``shift(median, d_k) - median``.
    The frame differences over *support* are fitted by least squares with
    that prediction split in two: its smooth part (Gaussian *smooth_px*: the
    object's own shape) and the rest (the fine solar texture around and on
    it, which always moves with the Sun); the smooth part's coefficient is
    returned.
    """
    ref = np.median(stack, axis=0)
    smooth = ndimage.gaussian_filter(ref, smooth_px)
    gram = np.zeros((2, 2))
    rhs = np.zeros(2)
    for frame, (dy, dx) in zip(stack, shifts):
        diff = (frame - ref)[support]
        whole = (ndimage.shift(ref, (dy, dx), order=1, mode="nearest") - ref)[support]
        part = (ndimage.shift(smooth, (dy, dx), order=1, mode="nearest") - smooth)[support]
        parts = np.stack([part, whole - part], axis=1).astype(np.float64)
        gram += parts.T @ parts
        rhs += parts.T @ diff
    try:
        return float(np.linalg.solve(gram + 1e-12 * np.trace(gram) * np.eye(2) + 1e-30 * np.eye(2), rhs)[0])
    except np.linalg.LinAlgError:
        return 0.0


def register_frames(frames: Any, labels: np.ndarray, *, n_frames: int = 16, min_rms_px: float = 0.7
                    ) -> tuple[Any, dict[str, Any]]:
    """Up to *n_frames* evenly spaced frames and the Sun's motion in them, *labels*' objects left out.

    :func:`._frames.register_sample` (the motion flat's registration; the
    objects are left out so that they do not pull the shifts towards zero).
    Returns ``(sample, info)``: a :class:`._frames.FrameSample`, or None (and
    ``info["note"]`` says why) with fewer than 3 frames, frames of another
    shape than *labels*, or an rms motion below *min_rms_px* (the frames
    cannot tell dust from the Sun then).
    """
    from ._frames import register_sample

    sample, info = register_sample(frames, labels.shape, n_frames=n_frames, exclude=labels > 0,
                                   min_rms_px=min_rms_px)
    info = {k: v for k, v in info.items() if k != "usable"}
    info["used"] = False
    return sample, info


def _object_patches(labels: np.ndarray, sample: Any, reach: int) -> list[tuple[int, np.ndarray, tuple[slice, slice]]]:
    """``(label, frames around it (n, h, w), window)`` for every object of *labels*.

    Each frame of *sample* is read once and only the windows (the objects'
    bounding boxes grown by *reach*) are kept; each object's frames are
    brought to a common level (transparency changes).
    """
    h, w = labels.shape
    windows = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            windows.append((k, (slice(max(sl[0].start - reach, 0), min(sl[0].stop + reach, h)),
                                slice(max(sl[1].start - reach, 0), min(sl[1].stop + reach, w)))))
    crops: list[list[np.ndarray]] = [[] for _ in windows]
    for i in sample.indices:
        frame = sample.get(int(i))
        for crop, (_, win) in zip(crops, windows):
            crop.append(frame[win])
    out = []
    for crop, (k, win) in zip(crops, windows):
        patch = np.stack(crop).astype(np.float32)
        level = np.median(patch, axis=(1, 2), keepdims=True)
        out.append((k, patch * (np.median(level) / np.maximum(level, 1e-12)), win))
    return out


def motion_filter(labels: np.ndarray, n_labels: int, frames: Any, *, n_frames: int = 16,
                  max_coupling: float = 0.85, min_rms_px: float = 0.7, sample: Any = None
                  ) -> tuple[np.ndarray, dict[int, float], dict[str, Any]]:
    """Tell dust (fixed to the sensor) from solar features (moving with the Sun) using the frames.

    Up to *n_frames* evenly spaced frames are registered
    (:func:`register_frames`; or *sample*, already registered for these
    *labels*, is used), then for each object of *labels* the frames around it
    give its :func:`_sun_coupling`. Objects above *max_coupling* are dropped.
    Only the objects' surroundings are kept in memory, one frame read at a time.

    Returns ``(keep, coupling, info)``: boolean per label (index 0 unused),
    the coupling per tested label, and what was done (``used``,
    ``n_frames_read``, ``shift_rms_px``, ``n_dropped``, or a ``note`` saying
    why nothing was tested).
    """
    keep = np.ones(n_labels + 1, bool)
    keep[0] = False
    if n_labels == 0:
        return keep, {}, {"used": False, "note": "no object"}
    if sample is None:
        sample, info = register_frames(frames, labels, n_frames=n_frames, min_rms_px=min_rms_px)
        if sample is None:
            return keep, {}, info
    info = {"used": False, "n_frames_read": len(sample.indices), "shift_rms_px": round(sample.rms_px, 3)}
    shifts = sample.shifts
    reach = int(np.ceil(2 * np.abs(shifts).max())) + 4
    coupling: dict[int, float] = {}
    for k, patch, win in _object_patches(labels, sample, reach):
        own = labels[win] == k
        support = ndimage.binary_dilation(own, iterations=2)
        diameter = 2.0 * np.sqrt(own.sum() / np.pi)
        c = _sun_coupling(patch, shifts, support, max(1.0, 0.15 * diameter))
        coupling[k] = c
        if c > max_coupling:
            keep[k] = False
    info.update(used=True, n_tested=len(coupling), n_dropped=int(np.count_nonzero(~keep[1:])))
    return keep, coupling, info


def sensor_fixed(labels: np.ndarray, ids: Any, motion: Any, *, min_deficit: float = 0.02,
                 min_sigma: float = 5.0) -> list[int]:
    """The objects among *ids* of *labels* under which the motion flat shows a sensor-fixed shadow.

    An object qualifies when most of it lies inside ``motion.support`` and the
    gain's 10th percentile there is darker than 1 by at least *min_deficit*
    and by *min_sigma* times the gain's median noise (``motion.sigma``).
    Sunspots and pores move with the Sun: the motion flat is 1 under them.
    """
    out = []
    for k in ids:
        obj = labels == int(k)
        inside = obj & motion.support
        if np.count_nonzero(inside) < 0.5 * np.count_nonzero(obj) or not inside.any():
            continue
        deficit = 1.0 - float(np.percentile(motion.gain[inside], 10))
        if deficit >= min_deficit and deficit >= min_sigma * float(np.median(motion.sigma[inside])):
            out.append(int(k))
    return out


def refine_with_motion(labels: np.ndarray, core: np.ndarray, motion: Any, *, depth: float = 0.01,
                       grow_px: int = 2) -> tuple[np.ndarray, dict[str, Any]]:
    """Each object's extent measured by the video's motion flat: the eye says where, physics says how far.

    For each object of *labels* (the kept detections), its new extent is the
    pixels within *grow_px* (city-block distance) of its *core* pixels (e.g.
    :func:`extent_mask`; the whole detection when it has none) where the
    motion flat's gain departs from 1 by more than *depth* (darker, or the
    bright rim; inside ``motion.support``), together with the core pixels
    where the motion says nothing (outside the support), the parts connected
    to the detection, holes filled.
    An object whose new extent would be empty keeps its *core* (or, without
    one, the detection): nothing is ever dropped.

    Returns ``(mask, info)``: boolean ``(H, W)``; ``info`` with ``used``,
    ``pixels_added`` and ``pixels_removed`` (against *core*).
    """
    departs = (np.abs(motion.gain - 1.0) > depth) & motion.support
    out = np.zeros(labels.shape, bool)
    h, w = labels.shape
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        pad = grow_px + 1
        win = (slice(max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)),
               slice(max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)))
        own = labels[win] == k
        own_core = own & core[win]
        seed = own_core if own_core.any() else own
        near = ndimage.binary_dilation(seed, iterations=grow_px) if grow_px else seed
        cand = (departs[win] & near) | (own_core & ~motion.support[win])
        parts, _ = ndimage.label(cand, structure=_EIGHT)
        ids = np.unique(parts[own])
        region = np.isin(parts, ids[ids > 0])
        if region.any():
            region = ndimage.binary_fill_holes(region)
        else:
            region = own_core if own_core.any() else own
        out[win] |= region
    info = {"used": True, "source": "motion flat", "depth": depth, "grow_px": grow_px,
            "pixels_added": int(np.count_nonzero(out & ~core)), "pixels_removed": int(np.count_nonzero(core & ~out))}
    return out, info

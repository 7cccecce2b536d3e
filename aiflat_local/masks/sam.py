"""The SAM masker: Segment-Anything-family models, run locally and prompted for dust.

Models (``model=``: a name of ``weights/manifest.json`` or a path): SAM v1
(transformers folders, or Meta's ``sam_vit_*.pth``, converted on load), SAM-HQ,
SAM 2 / 2.1 and SAM 3, all from local files only (:mod:`aiflat_local.weights`).

How
---
1. **Display image.** Dust is a multiplicative dip of 1.5 %-60 %, invisible
   to SAM in a linear stretch of a solar image. The window given to SAM is
   the reference divided by its local background (median over
   ``background_px``), mapped from ``[1 - stretch, 1 + stretch]`` to
   ``[0, 1]`` (``stretch=0``: plain 0.5-99.5 percentile stretch).
2. **Prompts.**
   ``points`` / ``boxes``: the proposer (``classical`` by default, any
   other registered masker) finds dust candidates; each candidate gives one
   point (its darkest pixel) or one box (its bounding box plus a margin).
   ``grid``: a ``grid_points_per_side``-squared point grid on every tile
   (automatic fallback, no proposer, slow).
   ``text``: SAM 3 only, ``text_prompts`` such as "dust spot", every
   instance returned.
3. **Native resolution.** The image is never shrunk: it is cut into
   ``tile_px`` tiles overlapping by ``overlap_px`` (:mod:`._sam_tiles`); a
   candidate larger than a tile gets its own crop. Each window is embedded
   once and all its prompts are decoded against that embedding, in batches
   of ``prompt_batch``. Every object is taken whole from one window, so the
   stitched mask has no seams.
4. **Filter and merge** (:mod:`._sam_filter`): too small/large, on the sky,
   elongated, not compact, not darker than its surroundings, or darker than
   dust can be -> rejected; duplicates merged; one mask per shadow.
   For ``points``/``boxes``, the best of SAM's masks for a candidate (by
   score) that passes and overlaps the candidate is used; when none passes
   and ``fallback`` is set, the proposer's own mask of that candidate is kept
   (counted in ``params["n_fallback"]``).

Cost: one encoder pass per window that has prompts (SAM ViT-B ~11 s per
window on 2 CPU cores, a fraction of a second on a GPU); half precision with
``dtype="float16"`` on CUDA.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from scipy import ndimage

from ..errors import BackendError, InputError
from ._sam_filter import FilterParams, ObjectMask, component, measure, merge, overlap, paint, reject_reason, tight
from ._sam_prompts import TEXT_PROMPTS, Candidate, batches, box_prompts, candidates_from_mask, grid_points, point_prompts
from ._sam_tiles import Window, assign_candidates, tile_grid, touches_inner_edge
from .base import MASKERS, MaskResult, prepare_reference

PROMPT_MODES = ("points", "boxes", "text", "grid")


def _odd(n: float) -> int:
    k = max(int(round(n)), 1)
    return k if k % 2 else k + 1


def local_background(img: np.ndarray, window_px: float) -> np.ndarray:
    """Median of *img* over about ``window_px`` pixels, computed on 8x-reduced blocks, bilinear back.

    A dust shadow much smaller than the window leaves it unchanged, so
    ``img / background`` shows the shadow as a dip below 1.
    """
    h, w = img.shape
    f = max(1, int(window_px // 8))
    hp, wp = -(-h // f) * f, -(-w // f) * f
    a = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    coarse = a.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float64)
    med = ndimage.median_filter(coarse, size=_odd(window_px / f), mode="nearest")
    ys = np.clip((np.arange(h) + 0.5) / f - 0.5, 0, med.shape[0] - 1)
    xs = np.clip((np.arange(w) + 0.5) / f - 0.5, 0, med.shape[1] - 1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return ndimage.map_coordinates(med, [yy, xx], order=1, mode="nearest").astype(np.float32)


def display_image(img: np.ndarray, stretch: float, background_px: float) -> np.ndarray:
    """The float32 [0, 1] image SAM sees (see step 1 of the module documentation)."""
    if stretch <= 0:
        lo, hi = np.percentile(img, [0.5, 99.5])
        return np.clip((img - lo) / max(float(hi - lo), 1e-12), 0, 1).astype(np.float32)
    bg = local_background(img, background_px)
    ratio = img / np.maximum(bg, 1e-12)
    return np.clip(0.5 + (ratio - 1.0) / (2.0 * stretch), 0.0, 1.0).astype(np.float32)


@MASKERS.register("sam", "Segment Anything family (SAM, SAM-HQ, SAM 2, SAM 3) prompted for dust; local weights",
                  requires=("torch", "transformers"), needs_weights=True)
@dataclass
class SamMasker:
    """Dust masks from a locally stored SAM-family model (see the module documentation).

    Parameters
    ----------
    model : str
        A model name of the weights store (``aiflat-local weights list``) or
        the path of a model folder / Meta checkpoint. Resolved (and its
        checksums verified) when the masker is created.
    device : str
        ``cpu``, ``cuda`` or ``cuda:N``.
    dtype : str
        ``float32``, or ``float16`` (CUDA only).
    proposer : str
        Masker that proposes candidates for ``points``/``boxes`` prompts.
    prompt_mode : str
        ``points``, ``boxes``, ``text`` (SAM 3) or ``grid``.
    text_prompts : sequence of str
        Concepts for ``text`` mode.
    tile_px, overlap_px : int
        Window size and overlap, image pixels (``tile_px=256``: SAM's
        256 x 256 masks are at native resolution).
    crop_min_px : int or None
        Smallest side of the crop around a candidate too large for a tile
        (default ``tile_px``).
    prompt_batch : int
        Prompts decoded together against one embedding.
    grid_points_per_side : int
        ``grid`` mode: points per tile side.
    box_margin, box_margin_px : float, int
        Box prompt = candidate box grown by ``max(box_margin_px, box_margin x side)``.
    stretch, background_px : float
        Display stretch (step 1); ``stretch=0``: linear percentile stretch.
    min_area_px, max_diameter_px, max_window_fraction, max_elongation, min_extent, min_contrast,
    max_particle_px, max_dust_depth, sky_fraction
        Filters (:mod:`._sam_filter`).
    min_score : float
        Smallest model score of a kept mask in ``points``/``boxes`` mode.
    grid_min_score : float
        Same for ``grid`` mode (its prompts are blind, so stricter).
    text_threshold : float
        Smallest SAM 3 detection score (``text`` mode).
    merge_iou, merge_contain : float
        Duplicate rule of the merge.
    fallback : bool
        Keep the proposer's mask for a candidate SAM gives no acceptable mask for.
    meta_loader : str
        Meta ``.pth``: ``converter`` (transformers SamModel) or ``segment_anything``.
    weights_dir : str or None
        Weights store directory (default: ``$AIFLAT_WEIGHTS`` or ``./weights``).
    proposer_options : dict
        Options of the proposer masker.
    progress : bool
        Show a progress bar over windows (stderr).
    backend : object, optional
        A ready backend (:class:`._sam_models.Backend`), instead of loading
        *model* (tests, benchmarks that reuse one model).
    """

    model: str = "sam-vit-base"
    device: str = "cpu"
    dtype: str = "float32"
    proposer: str = "classical"
    prompt_mode: str = "points"
    text_prompts: tuple[str, ...] = TEXT_PROMPTS
    tile_px: int = 256
    overlap_px: int = 64
    crop_min_px: int | None = None
    prompt_batch: int = 64
    grid_points_per_side: int = 16
    box_margin: float = 0.25
    box_margin_px: int = 2
    stretch: float = 0.15
    background_px: float = 96.0
    min_area_px: int = 5
    max_diameter_px: float = 160.0
    max_window_fraction: float = 0.25
    max_elongation: float = 2.5
    min_extent: float = 0.6
    min_contrast: float = 0.01
    max_particle_px: float = 12.0
    max_dust_depth: float = 0.75
    sky_fraction: float = 0.15
    min_score: float = 0.0
    grid_min_score: float = 0.8
    text_threshold: float = 0.3
    merge_iou: float = 0.5
    merge_contain: float = 0.8
    fallback: bool = True
    meta_loader: str = "converter"
    weights_dir: str | None = None
    proposer_options: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    backend: Any = field(default=None, repr=False, compare=False)

    name = "sam"

    def __post_init__(self) -> None:
        from ._sam_models import check_device_string, check_dtype_string

        if self.prompt_mode not in PROMPT_MODES:
            raise BackendError(f"prompt_mode must be one of {', '.join(PROMPT_MODES)}, not {self.prompt_mode!r}")
        check_device_string(self.device)
        check_dtype_string(self.dtype, self.device)
        if isinstance(self.text_prompts, str):
            self.text_prompts = (self.text_prompts,)
        self.text_prompts = tuple(str(t) for t in self.text_prompts)
        if self.prompt_mode == "text" and not self.text_prompts:
            raise BackendError("prompt_mode 'text' needs at least one text prompt")
        if self.proposer == self.name:
            raise BackendError("the sam masker cannot be its own proposer")
        if not (16 <= int(self.tile_px) and 0 <= int(self.overlap_px) < int(self.tile_px) // 2 + 1):
            raise BackendError(f"tile_px must be >= 16 and overlap_px in [0, tile_px / 2] "
                               f"(got {self.tile_px}, {self.overlap_px})")
        if self.meta_loader not in ("converter", "segment_anything"):
            raise BackendError(f"meta_loader must be 'converter' or 'segment_anything', not {self.meta_loader!r}")
        self._resolved = None
        if self.backend is None:
            from ..weights import WeightStore
            from ._sam_models import torch_device

            torch_device(self.device)
            self._resolved = WeightStore(self.weights_dir).resolve(self.model)

    # ------------------------------------------------------------------ provenance
    def filter_params(self) -> FilterParams:
        return FilterParams(**{k: getattr(self, k) for k in FilterParams.__dataclass_fields__})

    def params(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "backend"}
        d["text_prompts"] = list(self.text_prompts)
        d["proposer_options"] = dict(self.proposer_options)
        d["model_files"] = self._resolved.provenance() if self._resolved is not None else {"name": "injected backend"}
        return {"backend": self.name, **d}

    def _load(self):
        if self.backend is None:
            from ._sam_models import load_backend

            self.backend = load_backend(self._resolved, prompt_mode=self.prompt_mode, device=self.device,
                                        dtype=self.dtype, meta_loader=self.meta_loader)
        kinds = getattr(self.backend, "prompt_kinds", frozenset({"points", "boxes", "text"}))
        need = "text" if self.prompt_mode == "text" else "points"
        if need not in kinds:
            raise BackendError(f"model {self.model!r} ({getattr(self.backend, 'family', '?')}) cannot take "
                               f"{self.prompt_mode} prompts")
        return self.backend

    # ------------------------------------------------------------------ main
    def __call__(self, reference: np.ndarray, *, frames: Any = None) -> MaskResult:
        """Dust mask of *reference* (``(H, W)``, linear units, sensor orientation).

        Returns
        -------
        MaskResult
            ``mask`` float32 0/1; ``objects`` with ``label``, ``y``, ``x``,
            ``area``, ``diameter``, ``contrast``, ``depth``, ``elongation``,
            ``extent``, ``score``, ``source``, ``candidate``, ``bbox``
            (``[y0, x0, y1, x1]``); ``params`` with every option, the model's
            files and checksums, the device, counts (windows, prompts,
            candidates, fallbacks, rejections by reason) and timings.
        """
        t0 = time.perf_counter()
        img = _prepare(reference)
        backend = self._load()
        t_load = time.perf_counter() - t0
        disp = display_image(img, float(self.stretch), float(self.background_px))
        level = float(np.percentile(img, 99))
        sky_level = self.sky_fraction * level if np.isfinite(level) and level > 0 else -np.inf
        run = _Run(self, backend, img, disp, sky_level)
        if self.prompt_mode in ("points", "boxes"):
            run.prompted(frames)
        else:
            run.automatic()
        objects, n_dup = merge(run.objects, iou=self.merge_iou, contain=self.merge_contain)
        mask = paint(img.shape, objects)
        params = self.params()
        params.update(
            model_backend=backend.describe() if hasattr(backend, "describe") else {},
            n_objects=len(objects), n_duplicates=n_dup, **run.counts(),
            seconds_load=round(t_load, 3), seconds=round(time.perf_counter() - t0, 3),
            megapixels=round(img.size / 1e6, 4),
        )
        return MaskResult(mask.astype(np.float32), params, _describe(objects))


# --------------------------------------------------------------------------- one call's work
class _Run:
    """State of one masker call: windows, prompts, kept objects and counters."""

    def __init__(self, masker: SamMasker, backend: Any, img: np.ndarray, disp: np.ndarray, sky_level: float):
        self.m = masker
        self.backend = backend
        self.img = img
        self.disp = disp
        self.sky_level = sky_level
        self.fp = masker.filter_params()
        self.objects: list[ObjectMask] = []
        self.rejected: dict[str, int] = {}
        self.n_windows = self.n_prompts = self.n_candidates = self.n_fallback = 0
        self.t_embed = self.t_decode = 0.0
        self.proposer_info: dict[str, Any] = {}

    def counts(self) -> dict[str, Any]:
        return {"n_windows": self.n_windows, "n_prompts": self.n_prompts, "n_candidates": self.n_candidates,
                "n_fallback": self.n_fallback, "rejected": dict(sorted(self.rejected.items())),
                "seconds_embed": round(self.t_embed, 3), "seconds_decode": round(self.t_decode, 3),
                "proposer_result": self.proposer_info}

    def _reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def _windows(self, items):
        if self.m.progress:
            from tqdm import tqdm

            return tqdm(items, desc=f"sam ({self.m.prompt_mode})", unit="window", leave=False)
        return items

    def _embed(self, window: Window):
        t = time.perf_counter()
        emb = self.backend.embed(self.disp[window.slices()])
        self.t_embed += time.perf_counter() - t
        self.n_windows += 1
        return emb

    def _check(self, obj: ObjectMask, window: Window) -> str | None:
        stats = measure(obj, self.img, self.sky_level)
        return reject_reason(stats, self.fp, window.shape[0] * window.shape[1])

    # -------------------------------------------------------------- prompted by candidates
    def prompted(self, frames: Any) -> None:
        proposer = MASKERS.create(self.m.proposer, **self.m.proposer_options)
        pres = proposer(self.img, frames=frames)
        self.proposer_info = {"name": self.m.proposer, "n_objects": len(pres.objects),
                              "seconds": pres.params.get("seconds")}
        centers = [(float(o["y"]), float(o["x"])) for o in pres.objects if "y" in o and "x" in o]
        cands = candidates_from_mask(pres.binary, self.img, centers=centers)
        self.n_candidates = len(cands)
        if not cands:
            return
        tiles = tile_grid(self.img.shape, int(self.m.tile_px), int(self.m.overlap_px))
        groups = assign_candidates(cands, tiles, self.img.shape, margin=self.m.box_margin,
                                   margin_px=self.m.box_margin_px, crop_min_px=int(self.m.crop_min_px or self.m.tile_px))
        for window, group in self._windows(groups):
            emb = self._embed(window)
            for sl in batches(len(group), self.m.prompt_batch):
                part = group[sl]
                t = time.perf_counter()
                if self.m.prompt_mode == "points":
                    pred = self.backend.predict(emb, points=point_prompts(part, window.offset), multimask=True)
                else:
                    pred = self.backend.predict(emb, boxes=box_prompts(part, self.img.shape, window.offset,
                                                                       margin=self.m.box_margin,
                                                                       margin_px=self.m.box_margin_px),
                                                multimask=False)
                self.t_decode += time.perf_counter() - t
                self.n_prompts += len(part)
                for i, cand in enumerate(part):
                    self._choose(cand, window, pred.masks[i], pred.scores[i])

    def _choose(self, cand: Candidate, window: Window, masks: np.ndarray, scores: np.ndarray) -> None:
        """Keep the best-scoring of SAM's masks for *cand* that passes the filters, else the fallback."""
        px, py = cand.point
        own = ObjectMask(cand.mask, cand.bbox[0], cand.bbox[1])
        too_large = self.fp.max_window_fraction * window.shape[0] * window.shape[1]
        first_reason = None
        for k in np.argsort(-scores, kind="stable"):
            reason = self._try(masks[k], float(scores[k]), cand, own, (py - window.y0, px - window.x0),
                               window, too_large)
            if reason is None:
                return
            first_reason = first_reason or reason
        self._reject(first_reason or "empty")
        if self.m.fallback:
            obj = ObjectMask(cand.mask.copy(), cand.bbox[0], cand.bbox[1], source="proposer", candidate=cand.index)
            measure(obj, self.img, self.sky_level)
            self.objects.append(obj)
            self.n_fallback += 1

    def _try(self, mask: np.ndarray, score: float, cand: Candidate, own: ObjectMask, point: tuple[float, float],
             window: Window, too_large: float) -> str | None:
        """Accept one model mask for *cand* (appended to the objects) or say why not."""
        if score < self.m.min_score:
            return "low_score"
        if mask.sum() > too_large:  # cheap test first: filling holes only grows a mask
            return "large"
        crop = tight(mask)
        if crop is None:
            return "empty"
        sub, (r0, c0) = crop
        comp = component(sub, (point[0] - r0, point[1] - c0))
        obj = ObjectMask.from_mask(comp, (window.y0 + r0, window.x0 + c0), score=score, source=self.m.prompt_mode,
                                   candidate=cand.index)
        if obj.area > too_large:
            return "large"
        if not overlap(obj, own):
            return "off_target"
        if touches_inner_edge(obj.mask, (obj.y0, obj.x0), window, self.img.shape):
            # the candidate fits inside this window with its margin: a mask reaching the edge has leaked
            return "cut_by_tile"
        reason = self._check(obj, window)
        if reason is None:
            self.objects.append(obj)
        return reason

    # -------------------------------------------------------------- grid and text
    def automatic(self) -> None:
        tiles = tile_grid(self.img.shape, int(self.m.tile_px), int(self.m.overlap_px))
        shape = self.img.shape
        for window in self._windows(tiles):
            emb = self._embed(window)
            h, w = window.shape
            results = []
            t = time.perf_counter()
            if self.m.prompt_mode == "text":
                pred = self.backend.predict_text(emb, list(self.m.text_prompts), threshold=self.m.text_threshold)
                self.n_prompts += len(self.m.text_prompts)
                for i in range(pred.masks.shape[0]):
                    prompt = self.m.text_prompts[int(pred.prompt_index[i])] if pred.prompt_index is not None else None
                    results.append((pred.masks[i, 0], float(pred.scores[i, 0]), prompt))
                min_score = self.m.text_threshold
            else:
                pts = grid_points(h, w, self.m.grid_points_per_side)
                for sl in batches(len(pts), self.m.prompt_batch):
                    pred = self.backend.predict(emb, points=pts[sl], multimask=True)
                    self.n_prompts += len(pts[sl])
                    for i in range(pred.masks.shape[0]):
                        for k in range(pred.masks.shape[1]):
                            results.append((pred.masks[i, k], float(pred.scores[i, k]), None))
                min_score = self.m.grid_min_score
            self.t_decode += time.perf_counter() - t
            too_large = self.fp.max_window_fraction * h * w
            for mask, score, prompt in results:
                if score < min_score:
                    self._reject("low_score")
                    continue
                if mask.sum() > too_large:  # cheap test first: filling holes only grows a mask
                    self._reject("large")
                    continue
                crop = tight(mask)
                if crop is None:
                    self._reject("empty")
                    continue
                sub, (r0, c0) = crop
                obj = ObjectMask.from_mask(component(sub), (window.y0 + r0, window.x0 + c0), score=score,
                                           source=self.m.prompt_mode, prompt=prompt)
                if obj.area > too_large:
                    self._reject("large")
                    continue
                if touches_inner_edge(obj.mask, (obj.y0, obj.x0), window, shape):
                    self._reject("cut_by_tile")
                    continue
                cy, cx = obj.centroid()
                if not window.owns(cy, cx):
                    self._reject("other_tile")
                    continue
                reason = self._check(obj, window)
                if reason:
                    self._reject(reason)
                    continue
                self.objects.append(obj)


def _prepare(reference: np.ndarray) -> np.ndarray:
    return prepare_reference(reference, "sam")


def _describe(objects: list[ObjectMask]) -> list[dict[str, Any]]:
    out = []
    for i, obj in enumerate(sorted(objects, key=lambda o: (o.bbox[0], o.bbox[1])), start=1):
        s = obj.stats
        out.append({
            "label": i, "y": s.get("y"), "x": s.get("x"), "area": obj.area, "diameter": s.get("diameter"),
            "contrast": s.get("contrast"), "depth": s.get("depth"), "elongation": s.get("elongation"),
            "extent": s.get("extent"), "score": None if math.isnan(obj.score) else round(obj.score, 4),
            "source": obj.source, "candidate": obj.candidate, "prompt": obj.prompt,
            "bbox": [int(v) for v in obj.bbox],
        })
    return out

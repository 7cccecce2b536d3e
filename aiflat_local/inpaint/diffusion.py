"""Diffusion inpainting from local weights (Stable Diffusion / SDXL inpainting via diffusers).

The learned "eye" for the inpainting step, fenced in by deterministic code:

- The model only ever sees **windows** around clusters of masked pixels
  (with ``context_px`` of clean context), at its own resolution
  (``crop_size``, default the model's: 512 for SD 1.5, 1024 for SDXL), so
  a 1920 x 1200 frame with hundreds of small dust spots costs one window per
  dusty ``crop_size`` square, run ``batch_size`` at a time.
- Gray in, model RGB out: each window's brightness is mapped affinely into the
  model's ``[-1, 1]`` (a float32 shift and a power-of-two scale, so the map is
  undone exactly), replicated to RGB, and the model's RGB is averaged back.
- Only masked pixels are taken from the model (the VAE alters every pixel);
  everything else is the input, bit for bit. The flat builder then uses only
  ``reference / inpainted`` inside the soft mask and matches brightness on the
  clean pixels, so whatever the model does, the flat is exactly 1.0 outside
  the soft mask.
- ``ensemble=N`` samples each window with N seeds; the fill is their
  per-pixel median and :attr:`InpaintResult.spread` their robust standard
  deviation (``1.4826 * MAD``, image units): how much of the fill is the
  model's guess.
- Every seed is derived from ``seed``, the window and the re-roll round and
  recorded per region in ``params`` (``report.json``), so a run repeats.
  ``reroll=[ids]`` (or ``"all"``) draws new seeds (round ``roll``) for those
  regions only, like the original tool's R key; the others keep their fill.

Weights never come from the network: ``model`` is a weights-store name
(``weights/manifest.json``, e.g. ``sd-inpainting``, ``sdxl-inpainting``) or a
diffusers folder path; loading is offline (``local_files_only``).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np

from ..errors import BackendError, InputError
from .base import INPAINTERS, InpaintResult, check_inputs

DEFAULT_PROMPT = (
    "high resolution monochrome photograph of the solar surface through a telescope, clean optics, "
    "continuous solar granulation, smooth even brightness, sharp, detailed"
)
DEFAULT_NEGATIVE_PROMPT = (
    "dust, dust shadow, dark spot, blob, ring, donut, smudge, stain, scratch, hair, sunspot, text, "
    "watermark, frame, border, colour, color, blurry, artifact"
)


class _Job(NamedTuple):
    """One model sample: window index, re-roll round, ensemble member, seed."""

    window: int
    roll: int
    member: int
    seed: int


def parse_reroll(reroll: Sequence[int] | str | int | None) -> list[int] | str | None:
    """Normalise a re-roll request: None, ``"all"``, or a sorted list of region ids.

    Accepts an int, a sequence of ints, ``"all"``, or a string of ids
    separated by commas or spaces (``"3, 17"``).
    """
    if reroll is None:
        return None
    if isinstance(reroll, str):
        text = reroll.strip().lower()
        if text == "all":
            return "all"
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            reroll = [int(p) for p in parts]
        except ValueError:
            raise BackendError(f"reroll must be 'all' or region ids, got {text!r}") from None
    elif isinstance(reroll, (int, np.integer)):
        reroll = [int(reroll)]
    ids = sorted({int(r) for r in reroll})
    if any(r < 1 for r in ids):
        raise BackendError(f"region ids start at 1, got {ids[0]}")
    return ids or None


@INPAINTERS.register("diffusion", "local diffusion model (SD / SDXL inpainting) on crops around the dust",
                     requires=("torch", "diffusers", "transformers"), needs_weights=True)
@dataclass
class DiffusionInpainter:
    """Inpaint masked regions with a local diffusers inpainting model.

    Parameters
    ----------
    model : str
        Weights-store name (``sd-inpainting``, ``sdxl-inpainting``, an imported
        name) or a path to a diffusers inpainting folder.
    device : str
        ``cpu`` (slow but correct), ``cuda`` or ``cuda:N``.
    dtype : str or None
        ``float32``, ``float16`` (CUDA only) or ``bfloat16``; None = float16 on
        CUDA, float32 on CPU.
    steps : int
        Denoising steps per sample.
    guidance_scale : float
        Classifier-free guidance weight (<= 1 turns guidance off).
    prompt, negative_prompt : str
        Describe a clean solar image, and what must not be painted.
    seed : int
        Base seed (>= 0); every sample's seed derives from it (see :func:`derive_seed`).
    ensemble : int
        Samples per window; fill = per-pixel median, ``spread`` = robust std.
    reroll : list of int, "all" or None
        Region ids (``params["regions"][*]["id"]``) that get new seeds (round ``roll``).
    roll : int
        Re-roll round (1 = first re-roll, 2 = second, ...).
    batch_size : int or None
        Samples per model call; None = 1 on CPU, about 4 windows of 512 px on CUDA.
    context_px : int
        Minimum clean context around each region inside its window (image px).
    crop_size : int or None
        Model input size in px (multiple of 8); None = the model's native size.
    weights_dir : str or None
        Weights store to resolve names in (default: the usual store).
    hash_weights : bool
        Compute the sha256 of weight files the store has not pinned (provenance).
    progress : bool
        Show a progress bar over model calls.
    pipeline : object, optional
        An already loaded diffusers inpainting pipeline (or anything called
        the same way), used instead of loading ``model``.
    """

    model: str = "sd-inpainting"
    device: str = "cpu"
    dtype: str | None = None
    steps: int = 25
    guidance_scale: float = 5.0
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    seed: int = 0
    ensemble: int = 1
    reroll: Sequence[int] | str | None = None
    roll: int = 1
    batch_size: int | None = None
    context_px: int = 64
    crop_size: int | None = None
    weights_dir: str | None = None
    hash_weights: bool = True
    progress: bool = False
    pipeline: Any = field(default=None, repr=False, compare=False)
    _loaded: Any = field(default=None, init=False, repr=False, compare=False)

    name = "diffusion"

    def __post_init__(self) -> None:
        from ._diffusion_model import check_device_name, normalise_dtype

        try:
            self.steps, self.ensemble, self.seed, self.roll, self.context_px = (
                int(self.steps), int(self.ensemble), int(self.seed), int(self.roll), int(self.context_px))
            self.batch_size = None if self.batch_size is None else int(self.batch_size)
            self.crop_size = None if self.crop_size is None else int(self.crop_size)
            self.guidance_scale = float(self.guidance_scale)
        except (TypeError, ValueError) as exc:
            raise BackendError(f"diffusion inpainter: bad numeric option ({exc})") from None
        self.device = check_device_name(self.device)
        self.dtype = normalise_dtype(self.dtype, self.device)
        self.reroll = parse_reroll(self.reroll)
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (self.ensemble >= 1, f"ensemble must be >= 1, got {self.ensemble}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.roll >= 1, f"roll (re-roll round) must be >= 1, got {self.roll}"),
            (self.context_px >= 0, f"context_px must be >= 0, got {self.context_px}"),
            (self.batch_size is None or self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.crop_size is None or (self.crop_size >= 8 and self.crop_size % 8 == 0),
             f"crop_size must be a positive multiple of 8, got {self.crop_size}"),
            (self.guidance_scale >= 0, f"guidance_scale must be >= 0, got {self.guidance_scale}"),
        ]
        for ok, message in checks:
            if not ok:
                raise BackendError(f"diffusion inpainter: {message}")
        if self.pipeline is None and not str(self.model or "").strip():
            raise BackendError("diffusion inpainter: no model given (a weights name or a diffusers folder)")

    # ------------------------------------------------------------------ model
    def load(self):
        """Load (once) and return the model; raises one-line errors for weights, device, memory."""
        if self._loaded is None:
            from . import _diffusion_model as dm

            if self.pipeline is not None:
                self._loaded = dm.LoadedModel.wrap(self.pipeline, self.device, self.dtype,
                                                   label=str(self.model or "in-memory pipeline"))
            else:
                device = dm.check_device(self.device)
                root, entry = dm.resolve_model(str(self.model), self.weights_dir)
                self._loaded = dm.load(root, entry, device=device, dtype=self.dtype,
                                       hash_weights=self.hash_weights, label=str(self.model))
        return self._loaded

    def options(self) -> dict[str, Any]:
        """The constructor options as recorded in ``params`` (JSON-friendly)."""
        return {
            "backend": self.name, "model": str(self.model), "device": self.device, "dtype": self.dtype,
            "steps": int(self.steps), "guidance_scale": float(self.guidance_scale), "prompt": self.prompt,
            "negative_prompt": self.negative_prompt, "seed": int(self.seed), "ensemble": int(self.ensemble),
            "reroll": self.reroll, "roll": int(self.roll), "context_px": int(self.context_px),
        }

    def _batch_size(self, model) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        if not self.device.startswith("cuda"):
            return 1
        crop = int(self.crop_size or model.native_size)
        return max(1, round(4 * (512 / crop) ** 2))

    # ------------------------------------------------------------------ run
    def __call__(self, image: np.ndarray, mask: np.ndarray) -> InpaintResult:
        """Fill the True pixels of *mask* with the model.

        Parameters
        ----------
        image : (H, W) array
            Grayscale image, any real dtype (8/16-bit integers or floats, any
            brightness units).
        mask : (H, W) bool (or 0/1) array
            True = fill.

        Returns
        -------
        InpaintResult
            ``image``: float32, equal to ``image.astype(float32)`` outside the
            mask bit for bit. ``spread``: float32 robust std of the ensemble
            (image units, 0 outside the mask) when ``ensemble > 1``, else None.
            ``params``: options, model provenance (path, class, weights
            sha256), windows, and per region its box, window, re-roll round,
            seeds and spread summary.
        """
        from ._diffusion_crops import BrightnessMap, ensemble_fill, output_to_image, plan_windows, prepare_window

        t0 = time.perf_counter()
        img, m = check_inputs(image, mask, "2-D (grayscale)")
        out = img.astype(np.float32, copy=True)
        params = self.options()
        params.update(n_pixels=int(np.count_nonzero(m)), n_regions=0, n_windows=0, n_model_calls=0)
        if not m.any():
            params["seconds"] = round(time.perf_counter() - t0, 3)
            return InpaintResult(out, params, None)
        if m.all():
            raise InputError("mask covers the whole image: there is nothing to inpaint from")

        model = self.load()
        params.update(model.info, model=str(self.model))
        t_model = time.perf_counter()
        crop = int(self.crop_size or model.native_size)
        plan = plan_windows(m, crop, int(self.context_px))
        rolls = self._rolls(plan.n_regions)
        clean = img[~m]
        clean = clean[np.isfinite(clean)]
        fallback = BrightnessMap.from_context(clean[:: max(1, clean.size // 100_000)])
        batch = self._batch_size(model)
        jobs = self._jobs(plan, rolls)
        left = Counter((j.window, j.roll) for j in jobs)  # samples still to come per (window, roll)
        left_in_window = Counter(j.window for j in jobs)
        prepared: dict[int, Any] = {}
        mappings: dict[int, Any] = {}
        samples: dict[tuple[int, int], list[np.ndarray]] = {}
        spread_map = np.zeros(out.shape, dtype=np.float32) if self.ensemble > 1 else None
        regions: dict[int, dict[str, Any]] = {}
        for chunk in self._progress([jobs[i:i + batch] for i in range(0, len(jobs), batch)]):
            for j in chunk:
                if j.window not in prepared:
                    prepared[j.window] = prepare_window(img, m, plan.windows[j.window], model.cell, fallback)
                    mappings[j.window] = prepared[j.window].mapping
            gray = model.run(np.stack([prepared[j.window].gray for j in chunk]),
                             np.stack([prepared[j.window].mask for j in chunk]), [j.seed for j in chunk],
                             prompt=self.prompt, negative_prompt=self.negative_prompt, steps=int(self.steps),
                             guidance_scale=float(self.guidance_scale))
            params["n_model_calls"] += 1
            for j, g in zip(chunk, gray):
                key = (j.window, j.roll)
                samples.setdefault(key, []).append(output_to_image(g, plan.windows[j.window], mappings[j.window]))
                left[key] -= 1
                left_in_window[j.window] -= 1
                if left_in_window[j.window] == 0:
                    del prepared[j.window]  # every sample of this window is in
                if left[key] == 0:
                    fill, spread = ensemble_fill(np.stack(samples.pop(key)))
                    seeds = [i.seed for i in jobs if (i.window, i.roll) == key]
                    self._composite(plan, key, rolls, fill, spread, seeds, out, spread_map, regions)

        params.update(
            crop_size=crop, model_shape=list(plan.model_shape), batch_size=batch, n_regions=plan.n_regions,
            n_windows=len(plan.windows), n_windows_downscaled=sum(1 for w in plan.windows if w.factor > 1),
            n_samples=len(jobs), n_nonfinite_fill=int(np.count_nonzero(~np.isfinite(out[m]))),
            windows=[{**w.as_dict(), "offset": mappings[i].offset, "scale": mappings[i].scale}
                     for i, w in enumerate(plan.windows)],
            regions=[regions[rid] for rid in sorted(regions)],
            seconds_model=round(time.perf_counter() - t_model, 3),
            seconds=round(time.perf_counter() - t0, 3),
        )
        return InpaintResult(out, params, spread_map)

    def _jobs(self, plan, rolls: dict[int, int]) -> list[_Job]:
        """One sample per (window, re-roll round present in it, ensemble member), window-major."""
        from ._diffusion_crops import derive_seed

        jobs = []
        for wi, win in enumerate(plan.windows):
            for r in sorted({rolls[rid] for rid in win.regions}):
                for k in range(int(self.ensemble)):
                    jobs.append(_Job(wi, r, k, derive_seed(self.seed, win.key, r, k)))
        return jobs

    def _composite(self, plan, key: tuple[int, int], rolls: dict[int, int], fill: np.ndarray,
                   spread: np.ndarray | None, seeds: list[int], out: np.ndarray, spread_map: np.ndarray | None,
                   regions: dict[int, dict[str, Any]]) -> None:
        """Copy a finished window's fill into the masked pixels of its regions of re-roll round ``key[1]``."""
        from ._diffusion_crops import region_pixels

        wi, roll = key
        win = plan.windows[wi]
        if not np.isfinite(fill).any():
            raise BackendError(f"the diffusion model returned no finite pixel for window {wi} (in {self.dtype}); "
                               f"try --dtype float32")
        for rid in win.regions:
            if rolls[rid] != roll:
                continue
            (rows, cols), local = region_pixels(plan, rid, win)
            vals = fill[local]
            out[rows, cols] = vals
            sl = plan.boxes[rid - 1]
            info = {"id": rid, "bbox": [sl[0].start, sl[1].start, sl[0].stop, sl[1].stop],
                    "n_pixels": int(rows.size), "window": wi, "roll": roll, "seeds": list(seeds)}
            if spread is not None:
                s = spread[local]
                spread_map[rows, cols] = s
                with np.errstate(divide="ignore", invalid="ignore"):
                    rel = np.abs(s / vals)
                rel = rel[np.isfinite(rel)]
                info["spread_median"] = float(np.median(s))
                info["rel_spread_median"] = float(np.median(rel)) if rel.size else None
            regions[rid] = info

    def _rolls(self, n: int) -> dict[int, int]:
        """Re-roll round of every region id (0 = not re-rolled)."""
        rolls = dict.fromkeys(range(1, n + 1), 0)
        if self.reroll == "all":
            return dict.fromkeys(rolls, int(self.roll))
        for rid in self.reroll or []:
            if rid not in rolls:
                raise InputError(f"reroll: there is no region {rid}; this mask has regions 1 to {n}")
            rolls[rid] = int(self.roll)
        return rolls

    def _progress(self, batches: list) -> Any:
        if not self.progress:
            return batches
        from tqdm import tqdm

        return tqdm(batches, desc="diffusion inpaint", unit="call")

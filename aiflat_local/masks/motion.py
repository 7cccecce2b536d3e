"""The motion masker: dust is what stays on the sensor while the Sun moves.

It needs the video's frames. From up to ``max_frames`` of them it solves the
flat from all frame pairs (:func:`aiflat_local.motion.motion_flat`) and masks
where that flat departs from 1 beyond its noise
(:func:`aiflat_local.motion.evidence_mask`). Sunspots, pores and filaments move
with the Sun, so they are not in the motion flat and are not masked. Objects
that an appearance masker (``confirm``, default ``dustnet``) finds in the
temporal median are added when the motion evidence confirms them: their
darkening is fixed to the sensor (stationarity at least
``confirm_stationarity``) and significant (``confirm_sigma``); where the
motion says little (the frame border, the limb: outside
``MotionFlat.support``) they are kept as the appearance masker found them.

When the frames do not move enough (a still mount, a single image) the
appearance masker's mask is returned as is, and ``params["motion"]`` says
``{"used": false, "reason": "..."}``. After a call, ``masker.motion`` holds
the :class:`~aiflat_local.motion.MotionFlat` (gain, noise, support), so the
pipeline can build the flat from the same solve.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .base import MASKERS, MaskResult

_EIGHT = np.ones((3, 3), dtype=bool)


@MASKERS.register("motion", "dust = what stays on the sensor while the Sun moves (needs the video's frames)",
                  needs_frames=True)
class MotionMasker:
    """Mask dust from the video's motion (see the module notes).

    Parameters
    ----------
    max_frames : int
        Frames used for the motion flat (evenly spaced over the video).
    seed_sigma, grow_sigma, min_depth, grow_depth, min_area_px, min_stationarity
        Evidence thresholds, see :func:`aiflat_local.motion.evidence_mask`.
    confirm : str or None
        Appearance masker whose objects are added when the motion confirms
        them; also the fallback when the frames do not move enough. None: no
        appearance masker (an empty mask when motion cannot be used).
    confirm_sigma : float
        Significance of the sensor-fixed deficit an appearance object needs.
    confirm_stationarity : float
        Stationarity an appearance object needs (0 Sun-fixed .. 1 sensor-fixed).
    device : str
        ``"cpu"`` or ``"cuda"`` (torch FFTs) for the motion solve.
    progress : bool
        Progress bars.
    motion : MotionFlat, optional
        A motion flat already computed for these frames (skips the solve).

    After a call, ``masker.motion`` holds the motion flat that was used (or
    None when there were no frames).
    """

    name = "motion"

    def __init__(self, *, max_frames: int = 48, seed_sigma: float = 5.0, grow_sigma: float = 3.0,
                 min_depth: float = 0.003, grow_depth: float = 0.002, min_area_px: int = 4,
                 min_stationarity: float = 0.1, confirm: str | None = "dustnet", confirm_sigma: float = 3.0,
                 confirm_stationarity: float = 0.5, device: str = "cpu", progress: bool = False,
                 motion: Any = None) -> None:
        self.max_frames = int(max_frames)
        self.seed_sigma = float(seed_sigma)
        self.grow_sigma = float(grow_sigma)
        self.min_depth = float(min_depth)
        self.grow_depth = float(grow_depth)
        self.min_area_px = int(min_area_px)
        self.min_stationarity = float(min_stationarity)
        self.confirm = confirm or None
        self.confirm_sigma = float(confirm_sigma)
        self.confirm_stationarity = float(confirm_stationarity)
        self.device = device
        self.progress = bool(progress)
        # built now, so that missing weights or packages fail before any work
        self._appearance_masker = None
        if self.confirm:
            options = {"device": device} if MASKERS.accepts(self.confirm, "device") else {}
            self._appearance_masker = MASKERS.create(self.confirm, **options)
        self._given = motion
        self.motion = motion

    def params(self) -> dict[str, Any]:
        return {
            "backend": self.name, "max_frames": self.max_frames, "seed_sigma": self.seed_sigma,
            "grow_sigma": self.grow_sigma, "min_depth": self.min_depth, "grow_depth": self.grow_depth,
            "min_area_px": self.min_area_px, "min_stationarity": self.min_stationarity, "confirm": self.confirm,
            "confirm_sigma": self.confirm_sigma, "confirm_stationarity": self.confirm_stationarity,
            "device": self.device,
        }

    def __call__(self, reference: np.ndarray, *, frames: Any = None) -> MaskResult:
        from ..errors import InputError
        from ..motion import evidence_mask, motion_flat

        reference = np.asarray(reference, dtype=np.float32)
        if reference.ndim != 2:
            raise InputError(f"the motion masker needs a 2-D reference, got shape {reference.shape}")
        params = self.params()
        self.motion = self._given
        if frames is None and self.motion is None:
            return self._fallback(reference, params, "no video frames (a single image): the motion of the Sun "
                                  "cannot be used; appearance of the image only")
        if self.motion is None:
            self.motion = motion_flat(frames, max_frames=self.max_frames, device=self.device,
                                      progress=self.progress)
        mf = self.motion
        if mf.gain.shape != reference.shape:
            raise InputError(f"frames are {mf.gain.shape[1]} x {mf.gain.shape[0]} but the reference is "
                             f"{reference.shape[1]} x {reference.shape[0]}")
        if not mf.used:
            return self._fallback(reference, params, mf.reason, mf.to_dict(per_frame=False), frames)
        mask, objects = evidence_mask(mf, seed_sigma=self.seed_sigma, grow_sigma=self.grow_sigma,
                                      min_depth=self.min_depth, grow_depth=self.grow_depth,
                                      min_area_px=self.min_area_px, min_stationarity=self.min_stationarity)
        for ob in objects:
            ob["source"] = "motion"
        confirm_info: dict[str, Any] = {}
        if self.confirm:
            mask, added, confirm_info = self._confirm(reference, mf, mask, frames)
            for ob in added:
                ob["label"] = len(objects) + 1
                objects.append(ob)
        params["motion"] = {**mf.to_dict(per_frame=False), "n_objects_motion": sum(o["source"] == "motion"
                                                                                   for o in objects),
                            **confirm_info}
        return MaskResult(mask=mask.astype(np.float32), params=params, objects=objects)

    def _fallback(self, reference: np.ndarray, params: dict[str, Any], reason: str,
                  motion_info: dict[str, Any] | None = None, frames: Any = None) -> MaskResult:
        info = {**(motion_info or {}), "used": False, "reason": reason}
        params["motion"] = info
        if not self.confirm:
            return MaskResult(mask=np.zeros(reference.shape, dtype=np.float32), params=params, objects=[])
        result = _appearance(self._appearance_masker, reference, frames, self.motion)
        params["fallback"] = {"backend": self.confirm, "params": result.params}
        return MaskResult(mask=result.mask, params=params, objects=result.objects)

    def _confirm(self, reference: np.ndarray, mf: Any, mask: np.ndarray, frames: Any = None
                 ) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
        """Add the appearance masker's objects that the motion evidence confirms."""
        from ..motion import stationarity

        result = _appearance(self._appearance_masker, reference, frames, mf)
        lab, n = ndimage.label(result.binary, structure=_EIGHT)
        added: list[dict[str, Any]] = []
        n_overlap = n_rejected = n_unsupported = n_confirmed = 0
        out = mask.copy()
        for k, sl in enumerate(ndimage.find_objects(lab), start=1):
            if sl is None:
                continue
            obj = lab[sl] == k
            sup = mf.support[sl]
            # motion decides where it constrains the gain; the appearance masker where it does not
            # (the frame border, the sky and the band the limb sweeps)
            outside = obj & ~sup
            if outside.sum() >= max(self.min_area_px, 0.25 * obj.sum()):
                region = np.zeros(mask.shape, dtype=bool)
                region[sl] = outside
                out |= region
                n_unsupported += 1
                added.append(_describe_object(outside, sl, None, {}, f"{self.confirm} (outside the motion support)"))
            inside = obj & sup
            if (mask[sl] & inside).any():
                n_overlap += 1  # already found by motion
                continue
            if inside.sum() < self.min_area_px:
                continue
            region = np.zeros(mask.shape, dtype=bool)
            region[sl] = inside
            st = stationarity(mf, region)
            ok = (st["stationarity"] is not None and st["stationarity"] >= self.confirm_stationarity
                  and st["z_sensor"] is not None and st["z_sensor"] >= self.confirm_sigma)
            if not ok:
                n_rejected += 1
                continue
            out |= region
            n_confirmed += 1
            added.append(_describe_object(inside, sl, mf.gain[sl][inside], st, f"{self.confirm} (confirmed by motion)"))
        info = {"appearance_masker": self.confirm, "appearance_objects": int(n),
                "appearance_already_found": n_overlap, "appearance_confirmed": n_confirmed,
                "appearance_kept_outside_motion_support": n_unsupported,
                "appearance_rejected_as_sun_fixed_or_insignificant": n_rejected}
        return out, added, info


def _describe_object(obj: np.ndarray, sl: tuple[slice, slice], gains: np.ndarray | None, st: dict[str, Any],
                     source: str) -> dict[str, Any]:
    ys, xs = np.nonzero(obj)
    return {
        "y": round(float(ys.mean() + sl[0].start), 2), "x": round(float(xs.mean() + sl[1].start), 2),
        "area_px": int(obj.sum()), "depth": None if gains is None else round(float(1.0 - gains.min()), 4),
        "bbox": [int(sl[0].start), int(sl[0].stop), int(sl[1].start), int(sl[1].stop)],
        "stationarity": st.get("stationarity"), "d_sensor": st.get("d_sensor"), "d_sun": st.get("d_sun"),
        "z_sensor": st.get("z_sensor"), "source": source,
    }


def _appearance(masker: Any, reference: np.ndarray, frames: Any, motion: Any = None) -> MaskResult:
    """The appearance masker's result, given the frames too (``dustnet`` and ``classical`` use them to drop
    objects that move with the Sun) and the motion flat when it takes one (``dustnet`` measures its
    objects' extent with it)."""
    import inspect

    if motion is not None and "motion" in inspect.signature(masker.__call__).parameters:
        return masker(reference, frames=frames, motion=motion)
    return masker(reference, frames=frames)

"""Dust from motion: frame registration, the Sun-aligned median and the flat from all frame pairs.

Dust shadows are fixed to the sensor while the solar image drifts and jitters
from frame to frame. In the log domain frame ``k`` is

    L_k(x) = G(x) + s(x - d_k) + c_k + noise,

with ``G`` the log gain of the sensor (the flat; 0 = no attenuation), ``s``
the log Sun, ``d_k`` the Sun's shift in frame ``k`` and ``c_k`` its exposure
(transparency) offset. Every pair of frames ``(i, j)`` constrains the gain
(Kuhn, Lin & Loranz 1991): ``L_i(x) - L_j(x + d_j - d_i) = G(x) - G(x + d_j - d_i)``.

What is here
------------
:func:`register_frames`
    The sub-pixel shift of the Sun in every used frame relative to a
    reference frame, streaming (one frame in memory at a time), on a central
    crop in linear intensity (a seeing-blurred limb stays symmetric there):
    band-passed cross-correlation (integer peak) against the reference frame,
    then Gauss-Newton steps against Fourier-shifted templates (sub-pixel),
    then again against the Sun-aligned mean of all frames. The uncertainty of
    a shift is the scatter of the estimates from 3 x 3 sub-blocks, over 3.
:func:`motion_flat`
    The least-squares gain from all ordered frame pairs, solved by
    preconditioned conjugate gradients (see "The solver"). The dust does not
    move, so it pulls every registration towards zero shift (raw frames:
    ~0.05 px here; the issue measured 4.5 px for phase correlation). A first
    solve finds the dust deeper than 1 %; the frames are then registered
    again with those pixels *left out* (0.001-0.005 px on the simulator).
    Dividing them out instead is worse: a flat solved from biased shifts
    carries a faint imprint of the Sun, which pulls the shifts the same way
    again (0.03 px, converging over many rounds). Then the final solve.
:func:`aligned_median`
    The per-pixel median of the frames shifted onto one Sun position (Sun
    sharp, dust smeared), in bands of rows (bounded memory).
:func:`evidence_mask`
    Dust = where the motion gain departs from 1 beyond its noise
    (multi-scale significance with hysteresis), with per-object area, depth
    and a stationarity score (sensor-fixed versus Sun-fixed).
:func:`motion_decision`
    Whether the frames move enough to tell the dust from the Sun, and why not.
:func:`blend_gains`
    Motion gain where the motion constrains it, another gain (e.g. the
    inpainting route's) where it does not (the frame border, the limb).

The solver
----------
The objective sums, over all ordered pairs, ``W_ij (G - T_ij G - r_ij)^2``
with ``T_ij`` the (Fourier) shift by ``d_j - d_i``, ``r_ij = L_i - T_ij L_j``
and pair weights ``W_ij(x) = m(x) m(x + d_j - d_i)``: ``m`` is a smooth
sensor weight (1 inside, a raised-cosine taper to 0 at the frame border, 0
on the sky and where the limb sweeps), so a pair counts where both of its
pixels are usable. Because all pairs differ only by their shift, the normal
operator collapses into one convolution with the *pair-shift kernel* ``K``,
whose Fourier transform is ``|sum_k exp(2 pi i f . d_k)|^2``:

    A G = 2 m [ (K m) G - K (m G) ],

one real FFT pair per application, whatever the number of frames. The
right-hand side needs two FFTs per frame (one pass over the frames):

    b = 2 m [ sum_k L_k (T_{-d_k} mu) - T_F^* V ],  mu = sum_k T_{d_k} m,
    V = sum_k T_{d_k} (m L_k)  (the weighted Sun-aligned sum).

(The identities use ``T(a) T(b) = T(a b)``, exact for integer shifts and
accurate for sub-pixel Fourier shifts when ``m`` is smooth: only the products'
content beyond the Nyquist frequency, tiny for a seeing-blurred Sun, is lost.)
For ``m = 1`` the operator is diagonal in Fourier space, ``2 (N^2 - |F|^2)``,
which is the preconditioner: conjugate gradients converge in 10-60
iterations, where the classic KLL fixed-point iteration
(:func:`kll_fixed_point`) stalls on the large scales. A small Tikhonov term
(``eps``) holds the scales the motion barely constrains.

Motion leaves the gain's constant free, and per-frame exposure offsets trade
exactly against a linear ramp of the gain, so the gain is referred to a plane
plus a smooth background (48 px) fitted to the clean pixels around, i.e. it is
1.0 on the pixels outside the detected dust.

Noise: the final pass also measures each pixel's scatter of the frames about
the first solve's model. It is photon noise, and far above it where steep Sun
features (sunspot umbrae, pores) passed under changing seeing: the gain there
shows faint rings (~0.5-2 %) that the evidence mask must not take for dust.

Conventions
-----------
- Shifts are ``(dy, dx)`` in pixels: frame ``k`` shows at sensor ``(y, x)``
  what the reference frame shows at ``(y - dy, x - dx)`` (the simulator's
  convention, :mod:`aiflat_local.synth`).
- Gains are float32 ``(H, W)``, 1.0 = no attenuation, sensor orientation.
- Frames: mono as is, RGB averaged, Bayer/CMY mosaics balanced per CFA site
  (as :func:`aiflat_local.reference.balance_cfa`).
- ``device="cuda"`` runs the solver's FFTs with torch (imported only then);
  registration and masks stay on the CPU.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import scipy.fft as sfft
from scipy import ndimage

from .errors import InputError

__all__ = [
    "Registration", "MotionFlat", "register_frames", "aligned_median", "motion_flat",
    "motion_decision", "evidence_mask", "stationarity", "blend_gains", "kll_fixed_point",
    "select_frames", "shift_stats", "motion_soft_mask",
]

_WORKERS = max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
_EIGHT = np.ones((3, 3), dtype=bool)
_MAD = 1.4826
_MOSAIC_IDS = frozenset({8, 9, 10, 11, 16, 17, 18, 19})


# --------------------------------------------------------------------------- frames
class _Frames:
    """Uniform float32 mono access to a SerReader-like object, an ``(n, H, W[, 3])`` array or a list."""

    def __init__(self, source: Any) -> None:
        header = getattr(source, "header", None)
        self.color_id = int(getattr(header, "color_id", 0) or 0)
        if hasattr(source, "frame") and hasattr(source, "n_frames"):
            self.n = int(source.n_frames)
            self._fetch = source.frame
            self.shape = (int(source.height), int(source.width))
            self._band = getattr(source, "band", None)
        else:
            if isinstance(source, np.ndarray) and source.ndim not in (3, 4):
                raise InputError(f"frames must be (n, H, W) or (n, H, W, 3), got shape {source.shape}")
            self.n = len(source)
            if self.n == 0:
                raise InputError("no frames")
            self._fetch = source.__getitem__
            self.shape = tuple(np.shape(source[0])[:2])
            self._band = None
            self._array = source
        self._cfa: dict[int, np.ndarray] = {}

    def get(self, i: int) -> np.ndarray:
        f = np.asarray(self._fetch(int(i)), dtype=np.float32)
        if f.ndim == 3:
            f = f.mean(axis=2, dtype=np.float32)
        if self.color_id in _MOSAIC_IDS:
            f = self._balance(int(i), f)
        return f

    def rows(self, i: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``r0:r1`` of frame *i* (float32 mono, CFA-balanced like :meth:`get`)."""
        if self._band is not None and self.color_id not in _MOSAIC_IDS:
            f = np.asarray(self._band(np.array([int(i)]), r0, r1)[0], dtype=np.float32)
        elif self._band is None and self.color_id not in _MOSAIC_IDS:
            f = np.asarray(self._fetch(int(i))[r0:r1], dtype=np.float32)
        else:
            return self.get(i)[r0:r1]
        if f.ndim == 3:
            f = f.mean(axis=2, dtype=np.float32)
        return f

    def _balance(self, i: int, f: np.ndarray) -> np.ndarray:
        scale = self._cfa.get(i)
        if scale is None:
            scale = np.ones((2, 2), dtype=np.float32)
            for a in (0, 1):
                for b in (0, 1):
                    med = float(np.median(f[a::2, b::2]))
                    if np.isfinite(med) and med > 0:
                        scale[a, b] = med
            scale /= np.float32(scale.mean())
            self._cfa[i] = scale
        out = f.copy()
        for a in (0, 1):
            for b in (0, 1):
                out[a::2, b::2] /= scale[a, b]
        return out


def select_frames(n_total: int, frame_indices: Sequence[int] | np.ndarray | None = None,
                  max_frames: int | None = 48) -> np.ndarray:
    """The frames to use: *frame_indices* as given (validated), else up to *max_frames* evenly spaced.

    Returns a sorted int64 array of distinct frame numbers.
    """
    if frame_indices is not None:
        idx = np.asarray(frame_indices).astype(np.int64).ravel()
        if idx.size == 0:
            raise InputError("frame_indices selects no frame")
        if idx.min() < 0 or idx.max() >= n_total:
            raise InputError(f"frame indices must be in 0..{n_total - 1}")
        idx = np.unique(idx)
    else:
        n = n_total if not max_frames else min(n_total, int(max_frames))
        idx = np.unique(np.round(np.linspace(0, n_total - 1, max(n, 1))).astype(np.int64))
    if max_frames and idx.size > max_frames:
        idx = idx[np.unique(np.round(np.linspace(0, idx.size - 1, int(max_frames))).astype(np.int64))]
    return idx


# --------------------------------------------------------------------------- Fourier helpers
def _fast_len_below(n: int) -> int:
    """Largest FFT-friendly length <= n (5-smooth)."""
    k = n
    while k > 1 and sfft.next_fast_len(k, real=True) != k:
        k -= 1
    return max(k, 1)


def _freqs(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies (cycles/pixel) of an rfft2 grid: ``ky`` (Hc, 1), ``kx`` (1, Wc // 2 + 1)."""
    return sfft.fftfreq(shape[0])[:, None], sfft.rfftfreq(shape[1])[None, :]


def _phase(ky: np.ndarray, kx: np.ndarray, dy: float, dx: float) -> np.ndarray:
    """``exp(2 pi i (ky dy + kx dx))`` (complex64): multiplying a spectrum by it is ``u(x + d)``."""
    return (np.exp(2j * np.pi * ky * dy) * np.exp(2j * np.pi * kx * dx)).astype(np.complex64)


def _rfft2(a: np.ndarray) -> np.ndarray:
    return sfft.rfft2(a, workers=_WORKERS)


def _irfft2(a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return sfft.irfft2(a, s=shape, workers=_WORKERS)


def _gauss_transfer(ky: np.ndarray, kx: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-2.0 * np.pi ** 2 * sigma ** 2 * (ky ** 2 + kx ** 2))


def _tukey(n: int, flat_from: int) -> np.ndarray:
    """1 in the middle, raised cosine to 0 over *flat_from* samples at both ends."""
    w = np.ones(n)
    k = int(min(max(flat_from, 1), n // 2))
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 0.5) / k)
    w[:k] = ramp
    w[n - k:] = ramp[::-1]
    return w


# --------------------------------------------------------------------------- registration
@dataclass
class Registration:
    """Where the Sun is in every used frame.

    Attributes
    ----------
    shifts : ndarray, float64 (n, 2)
        ``(dy, dx)`` of the Sun in each used frame relative to the reference
        frame, pixels: frame ``k`` shows at ``(y, x)`` what the reference frame
        shows at ``(y - dy, x - dx)``. ``shifts[reference]`` is exactly 0.
    uncertainty : ndarray, float64 (n, 2)
        1-sigma uncertainty of each shift per axis, pixels (scatter of the
        estimates from 3 x 3 sub-blocks, over 3).
    frame_indices : ndarray, int64 (n,)
        Frame numbers in the video.
    reference_index : int
        Frame number of the reference frame (zero shift).
    rounds : int
        Registration passes over the frames (template refinements included).
    method : str
        What was matched to what.
    offsets : ndarray, float64 (n,)
        Natural-log brightness of each frame relative to the reference frame
        (exposure or transparency changes; 0.01 = 1 % brighter); zeros when
        not given.
    crop : tuple of int
        ``(y0, y1, x0, x1)``: the sensor region that was matched.
    """

    shifts: np.ndarray
    uncertainty: np.ndarray
    frame_indices: np.ndarray
    reference_index: int
    rounds: int
    method: str
    offsets: np.ndarray = field(default_factory=lambda: np.zeros(0))
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __post_init__(self) -> None:
        self.shifts = np.asarray(self.shifts, dtype=np.float64).reshape(-1, 2)
        self.frame_indices = np.asarray(self.frame_indices, dtype=np.int64).ravel()
        self.uncertainty = np.asarray(self.uncertainty, dtype=np.float64)
        offsets = np.asarray(self.offsets, dtype=np.float64).ravel()
        self.offsets = offsets if offsets.size == len(self.frame_indices) else np.zeros(len(self.frame_indices))

    @property
    def n(self) -> int:
        return int(len(self.frame_indices))

    def to_dict(self, per_frame: bool = True) -> dict[str, Any]:
        """JSON-friendly summary (shift statistics) and, with *per_frame*, every shift."""
        out: dict[str, Any] = {
            "method": self.method, "rounds": int(self.rounds), "n_frames": self.n,
            "reference_frame": int(self.reference_index), "crop": [int(v) for v in self.crop],
            **shift_stats(self.shifts),
            "uncertainty_median_px": _round(float(np.median(np.hypot(*self.uncertainty.T)))) if self.n else None,
            "uncertainty_max_px": _round(float(np.max(np.hypot(*self.uncertainty.T)))) if self.n else None,
        }
        if self.offsets.size:
            out["brightness_offset_rms"] = _round(float(np.std(self.offsets)))
        if per_frame:
            out["frames"] = [
                {"frame": int(f), "dy": _round(float(s[0])), "dx": _round(float(s[1])),
                 "sigma_dy": _round(float(u[0])), "sigma_dx": _round(float(u[1]))}
                for f, s, u in zip(self.frame_indices, self.shifts, self.uncertainty)
            ]
        return out


def _round(v: float, nd: int = 4) -> float:
    return float(round(v, nd))


def shift_stats(shifts: np.ndarray) -> dict[str, float]:
    """Spread of a set of shifts: rms about their mean, principal-axis rms, span, largest pair distance."""
    s = np.asarray(shifts, dtype=np.float64).reshape(-1, 2)
    if len(s) < 2:
        return {"shift_rms_px": 0.0, "shift_major_rms_px": 0.0, "shift_minor_rms_px": 0.0,
                "shift_span_y_px": 0.0, "shift_span_x_px": 0.0, "max_pair_shift_px": 0.0}
    c = s - s.mean(axis=0)
    ev = np.sort(np.linalg.eigvalsh(c.T @ c / len(s)))[::-1]
    span = s.max(axis=0) - s.min(axis=0)
    hull = s if len(s) <= 400 else s[np.linspace(0, len(s) - 1, 400).astype(int)]
    pair = float(np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)).max())
    return {
        "shift_rms_px": _round(float(np.sqrt((c ** 2).sum(axis=1).mean()))),
        "shift_major_rms_px": _round(float(np.sqrt(max(ev[0], 0.0)))),
        "shift_minor_rms_px": _round(float(np.sqrt(max(ev[1], 0.0)))),
        "shift_span_y_px": _round(float(span[0])), "shift_span_x_px": _round(float(span[1])),
        "max_pair_shift_px": _round(pair),
    }


def motion_decision(registration: Registration, *, min_frames: int = 4, min_rms_px: float = 0.5,
                    min_minor_rms_px: float = 0.2) -> tuple[bool, str]:
    """Do the frames move enough to tell dust (sensor-fixed) from the Sun (moving)?

    Parameters
    ----------
    registration : Registration
    min_frames : int
        Fewest frames the motion flat is computed from.
    min_rms_px : float
        Smallest rms of the shifts about their mean (both axes together), px.
    min_minor_rms_px : float
        Smallest rms across the main direction of motion, px: a Sun that moves
        along one line only leaves the gain undetermined across it.

    Returns
    -------
    (bool, str)
        Whether to use the motion flat, and a one-line reason for ``report.json``.
    """
    n = registration.n
    if n < min_frames:
        return False, (f"only {n} frame(s): the motion flat needs at least {min_frames} frames in which the "
                       "Sun moves; using the appearance of the median only")
    st = shift_stats(registration.shifts)
    noise = float(np.median(np.hypot(*registration.uncertainty.T))) if n else 0.0
    if st["shift_rms_px"] < max(min_rms_px, 3 * noise):
        return False, (f"the Sun barely moves ({st['shift_rms_px']:.2f} px rms over {n} frames, "
                       f"at least {max(min_rms_px, 3 * noise):.2f} px needed): dust cannot be told from "
                       "solar features by motion; using the appearance of the median only")
    if st["shift_minor_rms_px"] < min_minor_rms_px:
        return False, (f"the Sun moves along one line only ({st['shift_minor_rms_px']:.2f} px rms across it, "
                       f"at least {min_minor_rms_px:.2f} px needed): the gain across the motion is "
                       "undetermined; using the appearance of the median only")
    return True, (f"the Sun moves {st['shift_rms_px']:.2f} px rms ({st['shift_minor_rms_px']:.2f} px across the "
                  f"main direction) over {n} frames")


class _Matcher:
    """Band-passed matching of frame crops to a template (cross-correlation, then Gauss-Newton)."""

    def __init__(self, crop: tuple[int, int, int, int], max_shift: float, sigma_lo: float = 1.0,
                 sigma_hi: float = 8.0) -> None:
        y0, y1, x0, x1 = crop
        self.crop = crop
        self.shape = (y1 - y0, x1 - x0)
        self.ky, self.kx = _freqs(self.shape)
        self.bandpass = (_gauss_transfer(self.ky, self.kx, sigma_lo)
                         - _gauss_transfer(self.ky, self.kx, sigma_hi)).astype(np.float32)
        margin = int(math.ceil(max_shift + 2 * sigma_hi + 4))
        margin = min(margin, min(self.shape) // 3)
        self.max_shift = max_shift
        self.weight = np.outer(_tukey(self.shape[0], margin), _tukey(self.shape[1], margin)).astype(np.float32)
        # 3 x 3 sub-blocks for the uncertainty
        self.blocks = [(slice(a * self.shape[0] // 3, (a + 1) * self.shape[0] // 3),
                        slice(b * self.shape[1] // 3, (b + 1) * self.shape[1] // 3)) for a in range(3) for b in range(3)]
        self.template_hat: np.ndarray | None = None  # unfiltered template spectrum
        self._t_bp_hat: np.ndarray | None = None
        self._t_corr_hat: np.ndarray | None = None

    def set_exclude(self, exclude: np.ndarray | None, grow_px: int) -> None:
        """Give no weight to *exclude* (bool, crop-sized) grown by *grow_px* (the band-pass reach)."""
        if exclude is None or not exclude.any():
            return
        grown = ndimage.binary_dilation(exclude, iterations=max(grow_px, 0)) if grow_px > 0 else exclude
        self.weight = (self.weight * ~grown).astype(np.float32)

    def set_template(self, template: np.ndarray) -> None:
        """The Sun to match (linear intensity, any scale; crop-sized)."""
        t = np.asarray(template, dtype=np.float32)
        t = t / np.float32(max(float(np.mean(t)), 1e-12))
        self.template_hat = _rfft2(t)
        self._t_bp_hat = self.template_hat * self.bandpass
        t_bp = _irfft2(self._t_bp_hat, self.shape).astype(np.float32)
        self._t_corr_hat = np.conj(_rfft2(self.weight * t_bp))

    def spectrum(self, crop: np.ndarray) -> np.ndarray:
        return _rfft2(crop)

    def coarse(self, frame_hat: np.ndarray) -> tuple[float, float]:
        """Integer cross-correlation peak (+ parabolic refinement) within ``max_shift``."""
        f_bp = _irfft2(frame_hat * self.bandpass, self.shape).astype(np.float32)
        corr = _irfft2(_rfft2(self.weight * f_bp) * self._t_corr_hat, self.shape)
        r = int(max(1, min(self.max_shift, min(self.shape) // 2 - 2)))
        ys = np.r_[0:r + 1, self.shape[0] - r:self.shape[0]]
        xs = np.r_[0:r + 1, self.shape[1] - r:self.shape[1]]
        win = corr[np.ix_(ys, xs)]
        py, px = np.unravel_index(int(np.argmax(win)), win.shape)
        dy = float(ys[py] if ys[py] <= r else ys[py] - self.shape[0])
        dx = float(xs[px] if xs[px] <= r else xs[px] - self.shape[1])

        def parabola(a: float, b: float, c: float) -> float:
            den = a - 2 * b + c
            return 0.0 if den >= 0 else float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))

        iy, ix = int(ys[py]), int(xs[px])
        hy, hx = self.shape
        dy += parabola(corr[(iy - 1) % hy, ix], corr[iy, ix], corr[(iy + 1) % hy, ix])
        dx += parabola(corr[iy, (ix - 1) % hx], corr[iy, ix], corr[iy, (ix + 1) % hx])
        return dy, dx

    def refine(self, frame_hat: np.ndarray, crop: np.ndarray, d0: tuple[float, float], iterations: int = 3
               ) -> tuple[np.ndarray, np.ndarray, float]:
        """Gauss-Newton: ``frame(x) ~ template(x - d)`` on band-passed images.

        The template is shifted exactly (Fourier phase ramp); its gradient,
        which only steers the steps, by central differences. Returns ``(d,
        sigma, offset)``: the shift, its 1-sigma uncertainty per axis
        (sub-block scatter / 3) and the log-brightness offset of the frame
        relative to the template.
        """
        f_bp = _irfft2(frame_hat * self.bandpass, self.shape).astype(np.float32)
        d = np.array(d0, dtype=np.float64)
        w = self.weight
        sigma = np.full(2, np.nan)
        gy = np.zeros(self.shape, dtype=np.float32)
        gx = np.zeros(self.shape, dtype=np.float32)
        for it in range(iterations):
            t_d = _irfft2(self._t_bp_hat * _phase(self.ky, self.kx, -d[0], -d[1]), self.shape).astype(np.float32)
            gy[1:-1] = 0.5 * (t_d[2:] - t_d[:-2])
            gx[:, 1:-1] = 0.5 * (t_d[:, 2:] - t_d[:, :-2])
            r = f_bp - t_d
            wgy, wgx = w * gy, w * gx
            jtj = np.array([[np.sum(wgy * gy, dtype=np.float64), np.sum(wgy * gx, dtype=np.float64)],
                            [0.0, np.sum(wgx * gx, dtype=np.float64)]])
            jtj[1, 0] = jtj[0, 1]
            jtr = np.array([np.sum(wgy * r, dtype=np.float64), np.sum(wgx * r, dtype=np.float64)])
            # f(x) = t(x - d - e) ~ t_d(x) - grad(t_d) . e, so r = f - t_d ~ -grad . e
            try:
                step = -np.linalg.solve(jtj, jtr)
            except np.linalg.LinAlgError:
                break
            step = np.clip(step, -1.0, 1.0)
            d_prev = d.copy()
            d = d + step
            if it == iterations - 1 or float(np.abs(step).max()) < 2e-3:
                est = []
                for sy, sx in self.blocks:
                    a = np.array([[np.sum(wgy[sy, sx] * gy[sy, sx], dtype=np.float64),
                                   np.sum(wgy[sy, sx] * gx[sy, sx], dtype=np.float64)],
                                  [0.0, np.sum(wgx[sy, sx] * gx[sy, sx], dtype=np.float64)]])
                    a[1, 0] = a[0, 1]
                    v = np.array([np.sum(wgy[sy, sx] * r[sy, sx], dtype=np.float64),
                                  np.sum(wgx[sy, sx] * r[sy, sx], dtype=np.float64)])
                    if a[0, 0] > 0 and a[1, 1] > 0 and np.linalg.cond(a) < 1e6:
                        est.append(d_prev - np.linalg.solve(a, v))
                if len(est) >= 3:
                    sigma = np.array(est).std(axis=0, ddof=1) / math.sqrt(len(est))
                break
        # brightness: log of the weighted mean of the frame over that of the template at x - d
        t_full = _irfft2(self.template_hat * _phase(self.ky, self.kx, -d[0], -d[1]), self.shape)
        offset = math.log(max(float(np.sum(w * crop, dtype=np.float64)), 1e-30)
                          / max(float(np.sum(w * t_full, dtype=np.float64)), 1e-30))
        return d, sigma, offset


def _crop_box(shape: tuple[int, int], crop_px: int) -> tuple[int, int, int, int]:
    h, w = shape
    ch, cw = _fast_len_below(min(h, crop_px)), _fast_len_below(min(w, crop_px))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return y0, y0 + ch, x0, x0 + cw


def _crop(frame: np.ndarray, crop: tuple[int, int, int, int], flat: np.ndarray | None) -> tuple[np.ndarray, float]:
    """The matched crop of a frame (divided by *flat*), scaled to mean 1, and the log of that mean.

    Matching is done on linear intensities: a seeing-blurred limb stays
    symmetric there (not in the log), and dark sky adds little weight.
    """
    y0, y1, x0, x1 = crop
    f = frame[y0:y1, x0:x1].astype(np.float32)
    if flat is not None:
        f = f / flat[y0:y1, x0:x1]
    level = max(float(np.mean(f)), 1e-12)
    return f / np.float32(level), math.log(level)


def register_frames(
    reader: Any,
    *,
    frame_indices: Sequence[int] | np.ndarray | None = None,
    max_frames: int | None = 48,
    flat: np.ndarray | None = None,
    rounds: int = 1,
    template: np.ndarray | None = None,
    initial: Registration | None = None,
    reference_index: int | None = None,
    crop_px: int = 1024,
    max_shift_px: float | None = None,
    exclude: np.ndarray | None = None,
    exclude_grow_px: int = 6,
    progress: bool = False,
) -> Registration:
    """Sub-pixel shift of the Sun in every used frame, relative to a reference frame.

    Streaming: one frame is read at a time; the working memory is a few
    copies of the matched crop (at most ``crop_px`` square), whatever the
    number of frames.

    Parameters
    ----------
    reader
        A :class:`~aiflat_local.io.ser.SerReader` (or any object with
        ``frame(i)``, ``n_frames``, ``height``, ``width``), or an array
        ``(n, H, W)``.
    frame_indices
        Frames to use; default up to *max_frames* evenly spaced.
    flat
        A gain ``(H, W)`` (1.0 = none) the frames are divided by before
        matching; default none (raw frames: the dust pulls the shifts towards
        zero by a few hundredths of a pixel, see *exclude*).
    rounds
        Template refinements: after the first pass against the reference frame
        (or against *template*), the template is rebuilt as the Sun-aligned
        mean of all frames and every frame matched again, *rounds* times.
    template
        Image ``(H, W)`` (linear intensity, any scale) of the Sun at the
        reference frame's position with the dust removed (e.g. from
        :func:`motion_flat`); replaces the first pass.
    initial
        Shifts to start from (skips the cross-correlation search).
    reference_index
        Frame number of the zero shift; default the middle used frame.
    crop_px
        Side of the central region that is matched, pixels.
    max_shift_px
        Largest shift searched; default a quarter of the crop.
    exclude
        Bool ``(H, W)``: sensor pixels left out of the matching (e.g. the dust
        a first motion flat found), grown by *exclude_grow_px* (the band-pass
        reach), so that nothing fixed to the sensor pulls the shifts.
    progress
        tqdm progress bar.

    Returns
    -------
    Registration
    """
    frames = _Frames(reader)
    idx = select_frames(frames.n, frame_indices, max_frames) if initial is None else initial.frame_indices
    n = len(idx)
    if reference_index is None:
        reference_index = int(initial.reference_index) if initial is not None else int(idx[(n - 1) // 2])
    if reference_index not in set(idx.tolist()):
        raise InputError(f"reference frame {reference_index} is not among the used frames")
    ref_pos = int(np.flatnonzero(idx == reference_index)[0])
    crop = _crop_box(frames.shape, crop_px)
    ch, cw = crop[1] - crop[0], crop[3] - crop[2]
    max_shift = float(max_shift_px) if max_shift_px else max(2.0, min(ch, cw) / 4)
    matcher = _Matcher(crop, max_shift if initial is None else
                       min(max_shift, float(np.abs(initial.shifts).max()) + 4.0))
    if exclude is not None:
        y0, y1, x0, x1 = crop
        matcher.set_exclude(np.asarray(exclude, dtype=bool)[y0:y1, x0:x1], exclude_grow_px)
    method = "template matching of band-passed frames (cross-correlation + Gauss-Newton)"
    if exclude is not None:
        method += f", {int(np.count_nonzero(exclude))} sensor pixels (dust) left out"
    if flat is None:
        method += ", raw frames"
    else:
        flat = np.asarray(flat, dtype=np.float32)
        if flat.shape != frames.shape:
            raise InputError(f"flat shape {flat.shape} != frame shape {frames.shape}")
        method += ", frames divided by the given flat"

    shifts = np.zeros((n, 2)) if initial is None else np.array(initial.shifts, dtype=np.float64)
    sigma = np.full((n, 2), np.nan)
    offsets = np.zeros(n)
    search = initial is None
    bar = _bar(progress, n * (rounds + (1 if template is None else 0)), "registering")
    passes = 0
    if template is None:
        matcher.set_template(_crop(frames.get(int(idx[ref_pos])), crop, flat)[0])
        first = "the reference frame"
    else:
        y0, y1, x0, x1 = crop
        matcher.set_template(np.asarray(template, dtype=np.float32)[y0:y1, x0:x1])
        first = None
    total = rounds + (1 if template is None else 0)
    for p in range(total):
        acc = np.zeros_like(matcher.template_hat)
        wsum = 0.0
        for k, i in enumerate(idx):
            lc, level = _crop(frames.get(int(i)), crop, flat)
            spec = matcher.spectrum(lc)
            d0 = matcher.coarse(spec) if search else tuple(shifts[k])
            d, s, off = matcher.refine(spec, lc, d0, iterations=4 if search else 2)
            shifts[k], sigma[k], offsets[k] = d, s, off + level
            acc += spec * _phase(matcher.ky, matcher.kx, d[0], d[1])
            wsum += 1.0
            if bar is not None:
                bar.update()
        passes += 1
        search = False
        shifts -= shifts[ref_pos]
        if p < total - 1:  # rebuild the template: the Sun-aligned mean (dust smeared or divided out)
            matcher.set_template(_irfft2(acc / wsum, matcher.shape).astype(np.float32))
    if bar is not None:
        bar.close()
    if first:
        method += f"; first against {first}, then against the Sun-aligned mean ({rounds} time(s))"
    else:
        method += f"; against the given template ({rounds} pass(es))"
    sigma = np.where(np.isfinite(sigma), sigma, np.nanmax(sigma) if np.isfinite(sigma).any() else 0.0)
    offsets -= offsets[ref_pos]
    return Registration(shifts=shifts, uncertainty=sigma, frame_indices=idx, reference_index=reference_index,
                        rounds=passes, method=method, offsets=offsets, crop=crop)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False)


# --------------------------------------------------------------------------- aligned median
def _keys_weights(frac: float) -> np.ndarray:
    """Keys cubic (a = -0.5) interpolation weights for taps -1, 0, 1, 2 at fraction *frac*."""
    t = np.array([1 + frac, frac, 1 - frac, 2 - frac])
    a = -0.5
    w = np.where(t <= 1, (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1,
                 a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a)
    return w.astype(np.float32)


def _shift_axis(a: np.ndarray, shift: float, axis: int, out_start: int, out_len: int, src_start: int) -> np.ndarray:
    """``out[j] = a(out_start + j + shift)`` along *axis*, Keys cubic; ``a[0]`` is at coordinate *src_start*.

    Samples needed outside *a* are clamped to its edge (edge padding).
    """
    base = math.floor(shift)
    w = _keys_weights(shift - base)
    n = a.shape[axis]
    start = out_start + base - src_start  # index in a of out[0]'s tap 0
    lo_pad = max(0, 1 - start)
    hi_pad = max(0, start + out_len + 2 - n)
    if lo_pad or hi_pad:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (lo_pad, hi_pad)
        a = np.pad(a, pad, mode="edge")
    first = start + lo_pad - 1
    out = None
    for t, wt in enumerate(w):
        if wt == 0:
            continue
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(first + t, first + t + out_len)
        term = a[tuple(sl)] * wt
        out = term if out is None else out + term
    return out


def aligned_median(
    reader: Any,
    registration: Registration,
    *,
    flat: np.ndarray | None = None,
    at: str = "reference",
    max_memory_mb: float = 256,
    progress: bool = False,
) -> np.ndarray:
    """Per-pixel median of the used frames shifted onto one Sun position (Sun sharp, dust smeared).

    Parameters
    ----------
    reader
        The video (as for :func:`register_frames`).
    registration
        The shifts of the frames to use.
    flat
        Optional gain ``(H, W)`` the frames are divided by first (then the dust
        is divided out instead of smeared).
    at
        ``"reference"``: the Sun where the reference frame shows it;
        ``"mean"``: at its mean position over the used frames (where the
        temporal median, ``reference.fits``, shows it smeared).
    max_memory_mb
        Bound on the working memory (the shifted bands of all frames).
    progress
        tqdm progress bar over bands.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` in sensor orientation. Shifting uses Keys cubic
        interpolation; where a frame has no data (the Sun moved out of the
        frame near the border) only the frames that have it are used.
    """
    frames = _Frames(reader)
    h, w = frames.shape
    idx = registration.frame_indices
    shifts = np.asarray(registration.shifts, dtype=np.float64)
    if at == "mean":
        shifts = shifts - shifts.mean(axis=0)
    elif at != "reference":
        raise ValueError("at must be 'reference' or 'mean'")
    n = len(idx)
    if flat is not None:
        flat = np.asarray(flat, dtype=np.float32)
    budget = max(1, int(max_memory_mb * 2 ** 20))
    # working memory per row: the stack and the median's copy (2 x 4 bytes) and the validity (1 byte)
    rows = int(max(1, min(h, budget // max(1, n * w * 9))))
    out = np.empty((h, w), dtype=np.float32)
    bar = _bar(progress, -(-h // rows), "aligned median")
    for r0 in range(0, h, rows):
        r1 = min(h, r0 + rows)
        stack = np.empty((n, r1 - r0, w), dtype=np.float32)
        valid = np.empty((n, r1 - r0, w), dtype=bool)  # the frame has data there
        for k, i in enumerate(idx):
            dy, dx = shifts[k]
            a0 = min(max(0, r0 + math.floor(dy) - 2), h - 1)  # the rows this band needs (clamped)
            a1 = max(min(h, r1 + math.floor(dy) + 3), a0 + 1)
            band = frames.rows(int(i), a0, a1)
            if flat is not None:
                band = band / flat[a0:a1]
            t = _shift_axis(band, dy, 0, r0, r1 - r0, a0)
            stack[k] = _shift_axis(t, dx, 1, 0, w, 0)
            ys = np.arange(r0, r1) + dy
            xs = np.arange(w) + dx
            valid[k] = ((ys >= -0.5) & (ys <= h - 0.5))[:, None] & ((xs >= -0.5) & (xs <= w - 0.5))[None, :]
        med = np.median(stack, axis=0)
        if not valid.all():
            part = ~valid.all(axis=0)
            sub = stack[:, part]
            sub[~valid[:, part]] = np.nan
            with np.errstate(all="ignore"):
                fill = np.nanmedian(sub, axis=0) if sub.size else sub
            med[part] = np.where(np.isfinite(fill), fill, med[part])
        out[r0:r1] = med
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out


# --------------------------------------------------------------------------- the solver
class _Numpy:
    """Array backend of the solver: numpy + scipy.fft (threads)."""

    name = "cpu (scipy.fft)"

    def asarray(self, a: Any, complex_: bool = False) -> np.ndarray:
        return np.asarray(a, dtype=np.complex64 if complex_ else np.float32)

    def numpy(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def zeros(self, shape: tuple[int, ...], complex_: bool = False) -> np.ndarray:
        return np.zeros(shape, dtype=np.complex64 if complex_ else np.float32)

    def rfft2(self, a: np.ndarray) -> np.ndarray:
        return sfft.rfft2(a, workers=_WORKERS)

    def irfft2(self, a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return sfft.irfft2(a, s=shape, workers=_WORKERS)

    def dot(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.dot(a.ravel(), b.ravel().astype(np.float64)))

    def maximum(self, a: np.ndarray, v: float) -> np.ndarray:
        return np.maximum(a, np.float32(v))


class _Torch:
    """Array backend of the solver: torch tensors and torch.fft on *device* (float32/complex64)."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.name = f"{device} (torch.fft)"

    def asarray(self, a: Any, complex_: bool = False):
        t = self.torch
        return t.as_tensor(np.asarray(a, dtype=np.complex64 if complex_ else np.float32), device=self.device)

    def numpy(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()

    def zeros(self, shape: tuple[int, ...], complex_: bool = False):
        t = self.torch
        return t.zeros(shape, dtype=t.complex64 if complex_ else t.float32, device=self.device)

    def rfft2(self, a):
        return self.torch.fft.rfft2(a)

    def irfft2(self, a, shape: tuple[int, int]):
        return self.torch.fft.irfft2(a, s=shape)

    def dot(self, a, b) -> float:
        return float(self.torch.sum(a.double() * b.double()))

    def maximum(self, a, v: float):
        return self.torch.clamp(a, min=float(v))


def _backend(device: str):
    """``"cpu"``: numpy/scipy; ``"cuda"`` (or ``"cuda:N"``): torch on that device; ``"torch-cpu"``: torch on the CPU."""
    if device == "cpu":
        return _Numpy()
    if device == "torch-cpu":
        return _Torch("cpu")
    if device.startswith("cuda"):
        _require_cuda()
        return _Torch(device)
    raise InputError(f"device must be 'cpu' or 'cuda', not {device!r}")


class _PairSystem:
    """The all-pairs normal equations on a padded periodic canvas (see the module notes).

    Parameters
    ----------
    shape : (H, W) of the solved region.
    shifts : (n, 2) Sun shifts of the frames (any origin; the mean is the Sun coordinate origin).
    taper_px : width of the raised-cosine border taper of the sensor weight ``m``.
    eps : Tikhonov weight relative to ``2 N^2``.
    canvas : canvas shape to use (e.g. that of an earlier system), if large enough.
    xp : array backend (:class:`_Numpy` or :class:`_Torch`).
    weight : optional smooth sensor weight in [0, 1] (e.g. zero where the limb sweeps), multiplied into ``m``.

    Canvas arrays live on the backend; the public methods take and return
    numpy arrays except :meth:`rhs`, :meth:`apply` and :meth:`precondition`.
    """

    def __init__(self, shape: tuple[int, int], shifts: np.ndarray, taper_px: float, eps: float,
                 canvas: tuple[int, int] | None = None, xp: Any = None, weight: np.ndarray | None = None) -> None:
        self.xp = xp = xp or _Numpy()
        h, w = shape
        self.shape = shape
        self.n = len(shifts)
        d = np.asarray(shifts, dtype=np.float64)
        self.d = d - d.mean(axis=0)  # Sun coordinates: the mean position (pair shifts unchanged)
        span = d.max(axis=0) - d.min(axis=0)
        # Padding: the largest pair shift plus room for the sinc tails of the Fourier shifts, so that
        # nothing wraps around the periodic canvas (a given canvas may keep 16 px less).
        need = (h + int(math.ceil(span[0])) + 40, w + int(math.ceil(span[1])) + 40)
        if canvas is not None and canvas[0] >= need[0] - 16 and canvas[1] >= need[1] - 16:
            self.cshape = (int(canvas[0]), int(canvas[1]))
        else:
            self.cshape = (sfft.next_fast_len(need[0], real=True), sfft.next_fast_len(need[1], real=True))
        ky, kx = _freqs(self.cshape)
        m = np.zeros(self.cshape, dtype=np.float32)
        m[:h, :w] = np.outer(_tukey(h, int(taper_px)), _tukey(w, int(taper_px)))
        if weight is not None:
            m[:h, :w] *= np.clip(np.asarray(weight, dtype=np.float32), 0.0, 1.0)
        self._ey = np.exp(2j * np.pi * ky[:, 0][:, None] * self.d[None, :, 0]).astype(np.complex64)  # (hc, n)
        self._ex = np.exp(2j * np.pi * kx[0][None, :] * self.d[:, 1][:, None]).astype(np.complex64)  # (n, wk)
        F = (self._ey.astype(np.complex128) @ self._ex.astype(np.complex128))  # sum_k exp(2 pi i f . d_k)
        phi = F.real ** 2 + F.imag ** 2  # the pair-shift kernel |F|^2
        n2 = float(self.n) ** 2
        self.n2 = n2
        self.eps = float(eps) * 2 * n2
        self.m = xp.asarray(m)
        self.F = xp.asarray(F, complex_=True)
        self.Fc = xp.asarray(np.conj(F), complex_=True)
        self.phi = xp.asarray(phi)
        m_hat = xp.rfft2(self.m)
        self.mu_hat = self.F * m_hat
        self.mu = xp.irfft2(self.mu_hat, self.cshape)  # mu = sum_k T_{d_k} m: weight per Sun point
        self.c = xp.irfft2(self.phi * m_hat, self.cshape)  # K m: pair weight per sensor pixel
        self.domain_np = m > 1e-3
        self.domain = xp.asarray(self.domain_np.astype(np.float32))
        self.diag = 2 * self.m * self.c  # ~ diagonal of A (the KLL iteration divides by it)
        # Preconditioner: the exact inverse where m = 1 (Fourier-diagonal), restricted to the domain.
        # (A diagonal rescaling at the tapered border was tried: it slowed convergence 4x.)
        pre = 2 * (n2 - phi) + self.eps
        pre[0, 0] = 2 * n2  # the constant is not constrained (normalised later): do not amplify it
        self.pre_inv = xp.asarray(1.0 / pre)
        # accumulators of the right-hand side
        self._t1 = xp.zeros(self.cshape)
        self._v_hat = xp.zeros(phi.shape, complex_=True)
        self._canvas = xp.zeros(self.cshape)

    def phase(self, k: int):
        return self.xp.asarray(self._ey[:, k][:, None] * self._ex[k][None, :], complex_=True)

    def add_frame(self, k: int, log_frame: np.ndarray) -> None:
        """Accumulate frame *k* (log, offset removed; numpy ``(H, W)``) into the right-hand side."""
        xp = self.xp
        h, w = self.shape
        lf = xp.asarray(log_frame)
        c = self._canvas
        ml = self.m[:h, :w] * lf
        c[:h, :w] = ml
        ph = self.phase(k)
        self._v_hat += xp.rfft2(c) * ph
        mu_k = xp.irfft2(self.mu_hat * ph.conj(), self.cshape)[:h, :w]  # T_{-d_k} mu
        self._t1[:h, :w] += lf * mu_k

    def rhs(self):
        fv = self.xp.irfft2(self.Fc * self._v_hat, self.cshape)
        return 2 * self.m * (self._t1 - fv) * self.domain

    def apply(self, g):
        xp = self.xp
        g = g * self.domain
        kmg = xp.irfft2(self.phi * xp.rfft2(self.m * g), self.cshape)
        return (2 * self.m * (self.c * g - kmg) + self.eps * g) * self.domain

    def precondition(self, r):
        xp = self.xp
        return xp.irfft2(xp.rfft2(r * self.domain) * self.pre_inv, self.cshape) * self.domain

    def sun(self, g: np.ndarray, canvas: bool = False) -> np.ndarray:
        """Log Sun at the mean position: flat-fielded, Sun-aligned weighted mean of the frames.

        *g* is the log gain on the canvas (numpy). Sensor-sized, or canvas-sized with *canvas*.
        """
        xp = self.xp
        h, w = self.shape
        v = xp.irfft2(self._v_hat, self.cshape)
        fg = xp.irfft2(self.F * xp.rfft2(self.m * xp.asarray(g)), self.cshape)
        mu = xp.numpy(self.mu)
        s = xp.numpy(v - fg) / np.maximum(mu, 1e-6)
        seen = self.seen(canvas=True)
        s = np.where(seen, s, float(np.median(s[seen])) if seen.any() else 0.0)
        return (s if canvas else s[:h, :w]).astype(np.float32)

    def seen(self, canvas: bool = False) -> np.ndarray:
        """Sun points (mean position) that enough weighted frames see for :meth:`sun` to be valid."""
        h, w = self.shape
        ok = self.xp.numpy(self.mu) > 0.05 * self.n
        return ok if canvas else ok[:h, :w]

    def coverage(self) -> np.ndarray:
        """Share of the full pair weight each sensor pixel gets (about 1 in the interior)."""
        h, w = self.shape
        return (self.xp.numpy(self.m * self.c) / self.n2)[:h, :w].astype(np.float32)


def _pcg(system: _PairSystem, b, x0, tol: float, max_iter: int) -> tuple[Any, dict[str, Any]]:
    """Preconditioned conjugate gradients on ``A x = b`` (backend float32 arrays, float64 reductions).

    Stops when the residual over the supported pixels (coverage >= 0.5) is
    below *tol* relative to the right-hand side there: the tapered frame
    border converges slowly and matters little.
    """
    xp = system.xp
    x = xp.zeros(system.cshape) if x0 is None else x0 * 1.0
    r = b - system.apply(x) if x0 is not None else b * 1.0
    z = system.precondition(r)
    p = z * 1.0
    rz = xp.dot(r, z)
    h, w = system.shape
    inside_np = np.zeros(system.cshape, dtype=np.float32)
    inside_np[:h, :w] = system.coverage() >= 0.5
    inside = xp.asarray(inside_np)
    bnorm = math.sqrt(xp.dot(b * inside, b)) or 1.0
    rel = math.sqrt(xp.dot(r * inside, r)) / bnorm
    it = 0
    while it < max_iter and rel >= tol:
        it += 1
        ap = system.apply(p)
        pap = xp.dot(p, ap)
        if pap <= 0:
            break
        alpha = rz / pap
        x = x + alpha * p
        r = r - alpha * ap
        rel = math.sqrt(xp.dot(r * inside, r)) / bnorm
        if rel < tol:
            break
        z = system.precondition(r)
        rz_new = xp.dot(r, z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x, {"iterations": it, "relative_residual": float(rel)}


def kll_fixed_point(system: _PairSystem, b, iterations: int = 50) -> tuple[Any, dict[str, Any]]:
    """The classic KLL iteration: ``G <- < r_ij + G(x + d_j - d_i) >`` over all pairs, at every pixel.

    Each step averages, at every pixel, the pair differences ``r_ij`` (the
    same right-hand side as the conjugate gradients) plus the current gain at
    the pair's other end, read by bilinear interpolation as in Kuhn, Lin &
    Loranz (1991): a convex average, so the iteration is stable (with the
    Fourier-shift kernel, whose sinc lobes are negative, it diverges). Its
    fixed point solves the same equations up to that interpolation; it
    removes the fine scales in a few steps and the large ones very slowly.
    """
    xp = system.xp
    d = system.d
    pair = (d[None, :, :] - d[:, None, :]).reshape(-1, 2)  # d_j - d_i over all ordered pairs
    kernel = np.zeros(system.cshape, dtype=np.float64)
    base = np.floor(pair).astype(np.int64)
    frac = pair - base
    for ay in (0, 1):
        for ax in (0, 1):
            wgt = (frac[:, 0] if ay else 1 - frac[:, 0]) * (frac[:, 1] if ax else 1 - frac[:, 1])
            # G(x + delta) = sum_t kernel(t) G(x + t): the kernel sits at -delta for a convolution
            np.add.at(kernel, ((-(base[:, 0] + ay)) % system.cshape[0], (-(base[:, 1] + ax)) % system.cshape[1]), wgt)
    k_hat = xp.asarray(sfft.rfft2(kernel), complex_=True)
    conv = lambda v: xp.irfft2(k_hat * xp.rfft2(v), system.cshape)  # noqa: E731
    den = xp.numpy(system.m * conv(system.m))
    inv = xp.asarray(np.where(system.domain_np & (den > 1e-6), 1.0 / np.maximum(den, 1e-6), 0.0))
    half_b = 0.5 * b
    g = xp.zeros(system.cshape)
    for _ in range(iterations):
        g = (half_b + system.m * conv(system.m * g)) * inv
    return g, {"iterations": iterations, "interpolation": "bilinear"}


# --------------------------------------------------------------------------- the motion flat
@dataclass
class MotionFlat:
    """The flat the video's motion gives.

    Attributes
    ----------
    gain : ndarray, float32 (H, W)
        1.0 = no attenuation, normalised to 1 on clean pixels (outside the
        detected dust); 1.0 exactly where ``used`` is False.
    sigma : ndarray, float32 (H, W)
        1-sigma noise of the gain estimate per pixel (relative, 0.001 = 0.1 %).
    support : ndarray, bool (H, W)
        Where the motion constrains the gain: at least ``min_coverage`` (0.1)
        of the full pair weight (the outermost pixels of the frame and the
        band the limb sweeps have less; see :func:`motion_flat`).
    registration : Registration
    used : bool
        False when the frames do not move enough (see ``reason``).
    reason : str
        One line: why the motion flat is (not) used.
    sun : ndarray, float32 (H, W) or None
        The Sun at its mean position: the Sun-aligned geometric mean of the
        flat-fielded frames (dust divided out), in ADU.
    stats : dict
        Solver and timing facts (JSON-friendly).
    """

    gain: np.ndarray
    sigma: np.ndarray
    support: np.ndarray
    registration: Registration
    used: bool = True
    reason: str = ""
    sun: np.ndarray | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, per_frame: bool = True) -> dict[str, Any]:
        """``report.json``'s ``"motion"`` entry."""
        out: dict[str, Any] = {"used": bool(self.used), "reason": self.reason}
        out["registration"] = self.registration.to_dict(per_frame=per_frame)
        out.update({k: v for k, v in self.stats.items()})
        return out


def motion_flat(
    reader: Any,
    *,
    frame_indices: Sequence[int] | np.ndarray | None = None,
    max_frames: int = 48,
    device: str = "cpu",
    reregister: int = 1,
    taper_px: float = 12.0,
    tol: float = 3e-4,
    max_iter: int = 300,
    eps: float = 1e-4,
    crop_px: int = 1024,
    solver: str = "cg",
    kll_iterations: int = 50,
    exclude_depth: float = 0.01,
    exclude_grow_px: int = 8,
    warm_start: bool = True,
    limb_weighting: bool = True,
    bootstrap_rounds: int = 0,
    min_frames: int = 4,
    min_coverage: float | None = None,
    registration: Registration | None = None,
    progress: bool = False,
) -> MotionFlat:
    """The gain of every pixel from all frame pairs (see the module notes).

    Parameters
    ----------
    reader
        The video (SerReader, ``(n, H, W)`` array, ...).
    frame_indices, max_frames
        Frames to use (default up to 48 evenly spaced over the video).
    device
        ``"cpu"`` (scipy.fft) or ``"cuda"`` (torch FFTs; needs a CUDA torch).
    reregister
        Solve-then-register-again rounds before the final solve: the frames
        are matched again with the dust the solve found (deeper than
        *exclude_depth*, grown by *exclude_grow_px*) left out. 0: one solve
        with the first shifts (and no per-pixel noise model).
    taper_px
        Width of the raised-cosine border taper of the pair weights, px.
    tol, max_iter
        Conjugate-gradient stopping rule (residual over the supported pixels,
        relative) and cap; the first solves stop at ``max(tol, 1e-3)``.
    eps
        Tikhonov weight (relative to ``2 N^2``): holds the constant and the
        scales the motion barely constrains (well beyond the dust sizes).
    crop_px
        Side of the central region matched by the registration.
    solver
        ``"cg"`` (default) or ``"kll"`` (the classic fixed-point iteration,
        *kll_iterations* steps, for comparison; the first solves stay CG).
    warm_start
        Start the final solve from the previous one.
    limb_weighting
        Leave the sky and the band the limb sweeps out of the pairs (the log
        intensity jumps 30-fold there; see :func:`_limb_zone`).
    bootstrap_rounds
        Template refinements of the first registration (0: against the
        reference frame only; the later rounds refine anyway).
    min_frames
        Fewest frames for a motion flat (see :func:`motion_decision`).
    min_coverage
        The support (``MotionFlat.support``): pixels with at least this share
        of the full pair weight. The gain is as accurate down to 0.05 as in the
        interior (simulator: median error 0.10-0.13 %, p99 0.4-0.55 %, at the
        frame border and the limb alike) and fails below (2.5 % median, the
        outermost 1-2 px); 0.1 reaches to about 5 px from the frame edge
        (0.5 stopped at 8 px and missed a deep 2.3 px shadow 4 px from it).
        Default (None): 0.1 for ``solver="cg"``, 0.5 for ``"kll"`` (the fixed
        point has not converged where the pair weight is low: with 0.1 its
        border gain broke the evidence mask on the flats benchmark).
    registration
        Use these shifts instead of registering first.
    progress
        tqdm progress bars.

    Returns
    -------
    MotionFlat
        With ``used = False`` (gain exactly 1.0, no support) when
        :func:`motion_decision` says the frames do not move enough.
    """
    t_start = time.perf_counter()
    frames = _Frames(reader)
    h, w = frames.shape
    timings: dict[str, float] = {}
    t = time.perf_counter()
    if registration is None and len(select_frames(frames.n, frame_indices, max_frames)) < min_frames:
        idx = select_frames(frames.n, frame_indices, max_frames)
        registration = Registration(shifts=np.zeros((len(idx), 2)), uncertainty=np.zeros((len(idx), 2)),
                                    frame_indices=idx, reference_index=int(idx[(len(idx) - 1) // 2]), rounds=0,
                                    method="not registered (too few frames)", offsets=np.zeros(len(idx)))
    reg = registration or register_frames(reader, frame_indices=frame_indices, max_frames=max_frames,
                                          crop_px=crop_px, rounds=bootstrap_rounds, progress=progress)
    timings["registration"] = time.perf_counter() - t
    used, reason = motion_decision(reg, min_frames=min_frames)
    if not used:
        one = np.ones((h, w), dtype=np.float32)
        return MotionFlat(gain=one, sigma=np.zeros((h, w), np.float32), support=np.zeros((h, w), bool),
                          registration=reg, used=False, reason=reason,
                          stats={"timings_s": _timings(timings, t_start)})
    xp = _backend(device)
    ref_frame = frames.get(int(reg.reference_index))
    limb = _limb_zone(ref_frame, reg.shifts) if limb_weighting else None
    weight = None if limb is None else _smooth_weight(~limb, 3.0)
    solves = []
    model = None
    g_prev = None
    canvas = None
    for round_ in range(reregister):
        # A first solve finds the dust deeper than exclude_depth; the frames are then matched again with
        # it left out (not divided out: a flat solved from biased shifts carries a faint imprint of the
        # Sun, which would pull the shifts the same way again).
        t = time.perf_counter()
        system, g, info = _solve(frames, reg, (0, h, 0, w), taper_px, eps, max(tol, 1e-3), max_iter, "cg",
                                 kll_iterations, progress, xp, canvas=canvas, weight=weight)
        solves.append({"solver": "cg", **info})
        canvas = system.cshape
        inside = system.coverage() >= 0.5
        lg = ndimage.gaussian_filter(g[:h, :w], 1.0)
        lg -= np.median(lg[inside]) if inside.any() else 0.0
        dust = (np.abs(lg) > exclude_depth) & inside
        g_prev = g[:h, :w].copy()
        model = (g_prev, system.sun(g), reg.shifts.mean(axis=0))
        timings[f"solve_{round_ + 1}"] = time.perf_counter() - t
        del system, g
        t = time.perf_counter()
        reg = register_frames(reader, initial=reg, rounds=1, exclude=dust,
                              exclude_grow_px=exclude_grow_px, crop_px=crop_px, progress=progress)
        timings[f"registration_{round_ + 2}"] = time.perf_counter() - t

    t = time.perf_counter()
    system, g, info = _solve(frames, reg, (0, h, 0, w), taper_px, eps, tol, max_iter, solver, kll_iterations,
                             progress, xp, start=g_prev if warm_start else None, canvas=canvas, model=model,
                             weight=weight)
    var_e = info.pop("residual_variance", None)
    solves.append({"solver": solver, **info})
    timings[f"solve_{reregister + 1}"] = time.perf_counter() - t
    # the gain at x is about the mean over the frames of their residuals at x, and the Sun's estimate adds
    # as much again: sigma^2 = 2 var / N (var: the frames' scatter at x about the first solve's model)
    noise_model = None if var_e is None else np.sqrt(2.0 * var_e / reg.n).astype(np.float32)
    coverage = system.coverage()
    if min_coverage is None:
        min_coverage = 0.1 if solver == "cg" else 0.5
    support = coverage >= min_coverage
    log_gain, sigma, clean = _normalise(g[:h, :w].astype(np.float64), support, noise_model)
    sun_adu = np.exp(system.sun(g)).astype(np.float32)  # flat-fielded Sun at its mean position, ADU
    gain = np.exp(log_gain).astype(np.float32)
    stats = {
        "method": "all-pairs log-domain least squares (KLL) via the pair-shift kernel, "
                  + ("conjugate gradients with a Fourier preconditioner" if solver == "cg"
                     else f"classic fixed-point iteration ({kll_iterations} steps)"),
        "n_frames_used": reg.n, "frame_indices_first_last": [int(reg.frame_indices[0]), int(reg.frame_indices[-1])],
        "solves": solves, "taper_px": taper_px, "support_fraction": _round(float(support.mean())),
        "limb_or_sky_fraction": _round(float(limb.mean())) if limb is not None else 0.0,
        "device": xp.name,
        "clean_fraction": _round(float(clean.mean())),
        "noise_median": float(np.median(sigma[support])) if support.any() else None,
        "canvas": list(system.cshape),
        "timings_s": _timings(timings, t_start),
    }
    return MotionFlat(gain=gain, sigma=sigma.astype(np.float32), support=support, registration=reg, used=True,
                      reason=reason, sun=sun_adu, stats=stats)


def _solve(frames: _Frames, reg: Registration, box: tuple[int, int, int, int], taper_px: float, eps: float,
           tol: float, max_iter: int, solver: str, kll_iterations: int, progress: bool, xp: Any = None,
           start: np.ndarray | None = None, canvas: tuple[int, int] | None = None,
           model: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None, weight: np.ndarray | None = None,
           ) -> tuple[_PairSystem, np.ndarray, dict[str, Any]]:
    """Accumulate the frames (one pass) over the sensor region *box* and solve for the log gain.

    With *model* ``(log gain, log Sun at the mean position, that mean shift)``
    from an earlier solve, the same pass measures each pixel's scatter of the
    frames about it (``info["residual_variance"]``, sensor-sized): photon
    noise, and much more where steep Sun features (sunspot umbrae, pores, the
    limb) passed under changing seeing. The Sun is shifted for it with Keys
    cubic interpolation (short support: no ringing around the limb).

    Returns the system, the log gain on its canvas (numpy float32) and solver facts.
    """
    y0, y1, x0, x1 = box
    t = time.perf_counter()
    system = _PairSystem((y1 - y0, x1 - x0), reg.shifts, taper_px, eps, canvas=canvas, xp=xp, weight=weight)
    bar = _bar(progress, reg.n, "motion flat")
    sum_e = sum_e2 = None
    if model is not None:
        sum_e = np.zeros((y1 - y0, x1 - x0), dtype=np.float64)
        sum_e2 = np.zeros((y1 - y0, x1 - x0), dtype=np.float64)
    for k, i in enumerate(reg.frame_indices):
        lf = _log_frame(frames.get(int(i))[y0:y1, x0:x1]) - np.float32(reg.offsets[k])
        system.add_frame(k, lf)
        if model is not None:
            dy, dx = reg.shifts[k] - model[2]
            e = lf - model[0] - _shift_axis(_shift_axis(model[1], -dy, 0, 0, lf.shape[0], 0), -dx, 1, 0,
                                            lf.shape[1], 0)
            sum_e += e
            sum_e2 += e * e
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    b = system.rhs()
    t_acc = time.perf_counter() - t
    if solver == "kll":
        g, info = kll_fixed_point(system, b, kll_iterations)
    elif solver == "cg":
        guess = None
        if start is not None:  # warm start from a previous solve of the same region (sensor part)
            guess = np.zeros(system.cshape, dtype=np.float32)
            guess[: y1 - y0, : x1 - x0] = start
            guess = system.xp.asarray(guess)
        g, info = _pcg(system, b, guess, tol, max_iter)
    else:
        raise ValueError(f"solver must be 'cg' or 'kll', not {solver!r}")
    g = system.xp.numpy(g).astype(np.float32)
    if sum_e is not None:
        n = float(reg.n)
        info["residual_variance"] = np.maximum(sum_e2 / n - (sum_e / n) ** 2, 0.0).astype(np.float32)
    info["accumulate_s"] = round(t_acc, 3)
    info["solve_s"] = round(time.perf_counter() - t - t_acc, 3)
    return system, g, info


def _limb_zone(frame: np.ndarray, shifts: np.ndarray, sky_level: float = 0.3, min_sky_fraction: float = 0.01,
               blur_px: float = 2.0, margin_px: float = 4.0) -> np.ndarray | None:
    """Sensor pixels of the sky and of the band the limb sweeps over the video (None: no sky in the field).

    The sky is where the (lightly smoothed) frame is below *sky_level* of the
    disk (the 90th percentile), in connected regions of at least
    *min_sky_fraction* of the frame (so sunspot umbrae do not count). Its
    edge, grown by the largest shift from this frame plus *margin_px*, is
    where the frames' log intensity jumps by a factor of 30 under changing
    seeing: pairs are not trusted there. The sky itself is left out too: it
    would be an island joined to the disk by no pair, its gain level free.
    """
    f = ndimage.gaussian_filter(frame.astype(np.float32), blur_px, mode="nearest")
    level = float(np.percentile(f, 90))
    if not level > 0:
        return None
    sky = f < sky_level * level
    if not sky.any():
        return None
    lab, n = ndimage.label(sky)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    big = np.flatnonzero(sizes >= min_sky_fraction * sky.size)
    big = big[big > 0]
    if big.size == 0:
        return None
    sky = np.isin(lab, big)
    if sky.all():
        return None
    edge = sky & ~ndimage.binary_erosion(sky, border_value=1)
    d = np.asarray(shifts, dtype=np.float64)
    reach = float(np.sqrt(((d - d.mean(axis=0)) ** 2).sum(axis=1)).max() + np.abs(d.mean(axis=0)).max()) + margin_px
    return sky | (ndimage.distance_transform_edt(~edge) <= reach)


def _smooth_weight(keep: np.ndarray, sigma_px: float) -> np.ndarray:
    """A smooth weight in [0, 1]: 0 on ``~keep`` (grown by 2 sigma), rising to 1 over about 4 sigma."""
    grown = ndimage.distance_transform_edt(keep) > 2 * sigma_px
    return ndimage.gaussian_filter(grown.astype(np.float32), sigma_px, mode="nearest")


def _timings(timings: dict[str, float], t_start: float) -> dict[str, float]:
    return {**{k: round(v, 3) for k, v in timings.items()}, "total": round(time.perf_counter() - t_start, 3)}


def _require_cuda() -> None:
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise InputError("device 'cuda' needs torch (pip install torch)") from None
    if not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA device")


def _log_frame(frame: np.ndarray) -> np.ndarray:
    floor = max(1e-3 * float(np.mean(frame)), 1e-3)
    return np.log(np.maximum(frame, np.float32(floor))).astype(np.float32)


def _block_reduce(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    a = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    return a.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3))


def _upsample(coarse: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a block-reduced image (pixel-centre aligned)."""
    ys = np.clip((np.arange(shape[0]) + 0.5) / f - 0.5, 0, coarse.shape[0] - 1)
    xs = np.clip((np.arange(shape[1]) + 0.5) / f - 0.5, 0, coarse.shape[1] - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, coarse.shape[0] - 1)
    x1 = np.minimum(x0 + 1, coarse.shape[1] - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    rows = coarse[y0] * (1 - wy) + coarse[y1] * wy
    return (rows[:, x0] * (1 - wx) + rows[:, x1] * wx).astype(np.float32)


def _plane(g: np.ndarray, clean: np.ndarray, max_samples: int = 200_000) -> np.ndarray:
    """Least-squares plane ``a + b y + c x`` through *g* on the *clean* pixels (full size, float64)."""
    ys, xs = np.nonzero(clean)
    if ys.size < 3:
        return np.full(g.shape, float(np.median(g)) if g.size else 0.0)
    if ys.size > max_samples:
        pick = np.linspace(0, ys.size - 1, max_samples).astype(np.int64)
        ys, xs = ys[pick], xs[pick]
    a = np.column_stack([np.ones(ys.size), ys - g.shape[0] / 2, xs - g.shape[1] / 2])
    coef = np.linalg.lstsq(a, g[ys, xs].astype(np.float64), rcond=None)[0]
    yy = np.arange(g.shape[0])[:, None] - g.shape[0] / 2
    xx = np.arange(g.shape[1])[None, :] - g.shape[1] / 2
    return coef[0] + coef[1] * yy + coef[2] * xx


def _baseline(g: np.ndarray, clean: np.ndarray, sigma_px: float) -> np.ndarray:
    """Smooth background of *g* from the *clean* pixels only.

    A plane (the gauge freedom of the motion solution: per-frame exposure
    offsets trade exactly against a linear ramp of the gain) plus a
    normalised Gaussian convolution of what remains (block-reduced 8x;
    where no clean pixel is near, 0).
    """
    plane = _plane(g, clean)
    g = g - plane
    f = 8
    cm = _block_reduce(clean.astype(np.float64), f)
    gm = _block_reduce(np.where(clean, g, 0.0), f)
    s = sigma_px / f
    num = ndimage.gaussian_filter(gm, s, mode="nearest")
    den = ndimage.gaussian_filter(cm, s, mode="nearest")
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(den > 1e-3, num / np.maximum(den, 1e-12), 0.0)
    return plane + _upsample(b, f, g.shape)


def _noise_map(field_: np.ndarray, where: np.ndarray, tile: int = 64, statistic: str = "mad") -> np.ndarray:
    """Robust local noise (1.4826 MAD) of *field_* over *where*, in tiles, bilinear, full size.

    With ``statistic="median"``: the local median instead.
    """
    h, w = field_.shape
    ty, tx = max(1, -(-h // tile)), max(1, -(-w // tile))
    out = np.full((ty, tx), np.nan)
    for a in range(ty):
        for b in range(tx):
            sl = (slice(a * tile, (a + 1) * tile), slice(b * tile, (b + 1) * tile))
            v = field_[sl][where[sl]]
            if v.size >= 32:
                out[a, b] = _robust(v, statistic)
    if np.isnan(out).all():
        v = field_[where] if where.any() else field_.ravel()
        return np.full((h, w), _robust(v, statistic) + 1e-9, dtype=np.float32)
    out = np.where(np.isnan(out), np.nanmedian(out), out)
    if min(ty, tx) >= 3:
        out = ndimage.median_filter(out, size=3, mode="nearest")
    return np.maximum(_upsample(out, tile, (h, w)), 1e-9)


def _robust(v: np.ndarray, statistic: str) -> float:
    med = float(np.median(v))
    return med if statistic == "median" else float(_MAD * np.median(np.abs(v - med)))


@dataclass(frozen=True)
class _Detect:
    seed_sigma: float = 5.0
    grow_sigma: float = 3.0
    min_depth: float = 0.003
    grow_depth: float = 0.002
    scales_px: tuple[float, ...] = (0.0, 1.5, 3.0, 6.0)


def _detect(g: np.ndarray, support: np.ndarray, clean: np.ndarray, p: _Detect,
            elevation: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Multi-scale hysteresis detection of departures of the log gain *g* from 0.

    At each scale: Gaussian smoothing, noise = robust local scatter over the
    *clean* pixels times the local *elevation* of the noise (smoothed alike),
    seeds ``z >= seed_sigma`` and ``|g_s| >= min_depth``, grown over
    ``z >= grow_sigma`` and ``|g_s| >= grow_depth`` at the same scale.
    Returns ``(mask, zmax)``.
    """
    mask = np.zeros(g.shape, dtype=bool)
    zmax = np.zeros(g.shape, dtype=np.float32)
    typical = _typical(clean, elevation)
    for s in p.scales_px:
        gs, z = _significance(g, s, typical, elevation)
        np.maximum(zmax, z, out=zmax)
        seed = support & (z >= p.seed_sigma) & (np.abs(gs) >= p.min_depth)
        if not seed.any():
            continue
        grow = support & (z >= p.grow_sigma) & (np.abs(gs) >= p.grow_depth)
        lab, n = ndimage.label(grow, structure=_EIGHT)
        keep = np.zeros(n + 1, dtype=bool)
        keep[np.unique(lab[seed])] = True
        keep[0] = False
        mask |= keep[lab]
    # coarse scales find faint extended dust, but their smoothing also spreads small deep dust far out:
    # keep only pixels where the (lightly smoothed) gain itself departs by grow_depth
    fine = np.abs(ndimage.gaussian_filter(g, 1.0, mode="nearest")) >= p.grow_depth
    return ndimage.binary_fill_holes(mask & fine), zmax


def _typical(clean: np.ndarray, elevation: np.ndarray | None) -> np.ndarray:
    """The clean pixels of typical noise (elevation at most 1.5; all clean ones when too few)."""
    typical = clean if elevation is None else clean & (elevation <= 1.5)
    return typical if typical.sum() >= 100 else clean


def _significance(g: np.ndarray, scale_px: float, typical: np.ndarray, elevation: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The log gain *g* smoothed by a Gaussian of *scale_px* and its significance ``|g_s| / noise``.

    The noise is the robust local scatter (1.4826 MAD, in tiles) of the
    smoothed gain over the *typical* clean pixels, times the local
    *elevation* of the noise smoothed alike. Returns ``(g_s, z)``, z float32.
    """
    s = float(scale_px)
    gs = ndimage.gaussian_filter(g, s, mode="nearest") if s > 0 else g
    noise = _noise_map(gs, typical, tile=64 if s <= 2 else 96)
    if elevation is not None:
        e2 = ndimage.gaussian_filter(elevation.astype(np.float64) ** 2, s, mode="nearest") if s > 0 else elevation ** 2
        noise = noise * np.sqrt(e2)
    return gs, (np.abs(gs) / noise).astype(np.float32)


def _normalise(log_gain: np.ndarray, support: np.ndarray, noise_model: np.ndarray | None = None,
               detect: _Detect = _Detect(), rounds: int = 3, baseline_px: float = 48.0
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero the log gain on clean pixels, locally; per-pixel noise; the clean pixels used.

    Motion leaves the constant free, and per-frame exposure offsets trade
    against a linear ramp of the gain, so the gain is referred to a plane plus
    a smooth background fitted to the clean pixels around (``baseline_px``),
    not to one global level: clean pixels are those outside the detected dust.
    The noise is *noise_model* (its shape: higher where steep Sun features
    passed) scaled to the robust scatter of the clean pixels.
    """
    g = log_gain - float(np.median(log_gain[support])) if support.any() else log_gain.copy()
    clean = support.copy()
    elevation = _elevation(noise_model, support)
    for _ in range(rounds):
        r = g - _baseline(g, clean, baseline_px)
        dust, _ = _detect(r, support, clean, detect, elevation)
        new_clean = support & ~ndimage.binary_dilation(dust, iterations=4)
        if new_clean.sum() < 100:
            break
        clean = new_clean
    g = g - _baseline(g, clean, baseline_px)
    sigma = _noise_map(g, clean & (elevation <= 1.5)) * elevation
    return g, sigma, clean


def _elevation(noise_model: np.ndarray | None, where: np.ndarray) -> np.ndarray:
    """*noise_model* over its local typical level (tiles), floored at 0.5; ones without a model."""
    if noise_model is None:
        return np.ones(where.shape, dtype=np.float32)
    typical = _noise_map(noise_model, where, tile=64, statistic="median")
    return np.maximum(noise_model / typical, 0.5).astype(np.float32)


# --------------------------------------------------------------------------- evidence
def evidence_mask(
    motion: MotionFlat,
    *,
    seed_sigma: float = 5.0,
    grow_sigma: float = 3.0,
    min_depth: float = 0.003,
    grow_depth: float = 0.002,
    min_area_px: int = 4,
    min_stationarity: float = 0.1,
    scales_px: Sequence[float] = (0.0, 1.5, 3.0, 6.0),
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Dust = where the motion gain departs from 1 beyond its noise.

    At each smoothing scale the log gain is smoothed by a Gaussian and divided
    by its own robust local noise (1.4826 MAD over clean pixels, in tiles).
    Seeds: at least *seed_sigma* significant and *min_depth* deep (or bright:
    diffraction rims count); grown over pixels at least *grow_sigma*
    significant and *grow_depth* deep at the same scale; holes filled;
    objects under *min_area_px* dropped. Only pixels with motion support are
    considered.

    Then each object must be a sensor-fixed *deficit*: its mean gain below
    the ring around it by at least 3 times its noise, and its stationarity
    (:func:`stationarity`) at least *min_stationarity*. This drops what the
    solver leaves where the Sun has steep edges that the frames do not repeat
    exactly (sunspot umbrae, pores and the limb, under changing seeing): there
    the gain shows faint rings of either sign a hundred times weaker than the
    feature itself.

    Returns
    -------
    mask : ndarray, bool (H, W)
    objects : list of dict
        ``label``, ``y``, ``x`` (centroid), ``area_px``, ``depth``
        (``1 - min gain``), ``rim`` (``max gain - 1``), ``significance``
        (peak), ``bbox`` (``[y0, y1, x0, x1]``), ``stationarity``,
        ``d_sensor``, ``d_sun`` (see :func:`stationarity`).
    """
    if not motion.used:
        return np.zeros(motion.gain.shape, dtype=bool), []
    g = np.log(np.maximum(motion.gain.astype(np.float64), 1e-6))
    support = motion.support
    p = _Detect(seed_sigma, grow_sigma, min_depth, grow_depth, tuple(scales_px))
    elevation = _elevation(motion.sigma, support)
    found, _ = _detect(g, support, support, p, elevation)
    clean = support & ~ndimage.binary_dilation(found, iterations=4)
    if clean.sum() < 100:
        clean = support
    mask, zmax = _detect(g, support, clean, p, elevation)
    lab, n = ndimage.label(mask, structure=_EIGHT)
    objects: list[dict[str, Any]] = []
    out = np.zeros(g.shape, dtype=bool)
    for k, sl in enumerate(ndimage.find_objects(lab), start=1):
        if sl is None:
            continue
        obj = lab[sl] == k
        area = int(obj.sum())
        if area < min_area_px:
            continue
        out[sl] |= obj
        ys, xs = np.nonzero(obj)
        gains = motion.gain[sl][obj]
        region = np.zeros(g.shape, dtype=bool)
        region[sl] = obj
        ob = {
            "label": len(objects) + 1,
            "y": _round(float(ys.mean() + sl[0].start), 2), "x": _round(float(xs.mean() + sl[1].start), 2),
            "area_px": area, "depth": _round(float(1.0 - gains.min())),
            "rim": _round(float(max(gains.max() - 1.0, 0.0))),
            "significance": _round(float(zmax[sl][obj].max()), 2),
            "bbox": [int(sl[0].start), int(sl[0].stop), int(sl[1].start), int(sl[1].stop)],
        }
        st = stationarity(motion, region)
        if st["z_sensor"] is None or st["z_sensor"] < 3 or (st["stationarity"] or 0.0) < min_stationarity:
            out[sl] &= ~obj
            continue
        ob.update(stationarity=st["stationarity"], d_sensor=st["d_sensor"], d_sun=st["d_sun"],
                  z_sensor=st["z_sensor"])
        objects.append(ob)
    return out, objects


def stationarity(motion: MotionFlat, region: np.ndarray, ring_px: int = 6) -> dict[str, Any]:
    """How much of an object's darkening is fixed to the sensor (1) rather than to the Sun (0).

    Over *region* (bool ``(H, W)``, sensor pixels, e.g. an object found in the
    temporal median): the sensor-fixed deficit is how much darker the motion
    gain gets in the region than in a ring around it, ``d_sensor = 1 -
    p5(gain) / median_ring(gain)`` (p5: the 5th percentile, a robust
    minimum); the Sun-fixed deficit is how much darker the
    flat-fielded Sun gets where it passed under the region during the video
    (the region grown by the largest shift), ``d_sun = 1 - p5(sun) /
    median_ring(sun)``. The score is ``d_sensor / (d_sensor + d_sun)``, both
    floored at 0 (None when both are 0): dust scores near 1 (0.2-0.5 for
    faint dust on dark texture); a sunspot, pore or filament, and the faint
    rings the gain shows where one passed, score near 0.

    Returns
    -------
    dict
        ``stationarity``, ``d_sensor``, ``d_sun``, ``z_sensor`` (the sensor
        deficit over the gain's per-pixel noise there).
    """
    region = np.asarray(region, dtype=bool)
    if not motion.used or not region.any() or motion.sun is None:
        return {"stationarity": None, "d_sensor": None, "d_sun": None, "z_sensor": None}
    d = motion.registration.shifts
    reach = int(math.ceil(float(np.sqrt(((d - d.mean(axis=0)) ** 2).sum(axis=1)).max()))) + 1 if len(d) else 1
    ys, xs = np.nonzero(region)
    pad = reach + ring_px + 2
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, region.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, region.shape[1])
    r = region[y0:y1, x0:x1]
    ring = ndimage.binary_dilation(r, iterations=ring_px) & ~ndimage.binary_dilation(r, iterations=2)
    swept = ndimage.binary_dilation(r, iterations=reach)
    sun_ring = ndimage.binary_dilation(swept, iterations=ring_px) & ~ndimage.binary_dilation(swept, iterations=2)
    if not ring.any():
        ring = ~r
    if not sun_ring.any():
        sun_ring = ~swept if (~swept).any() else ring
    gain = motion.gain[y0:y1, x0:x1].astype(np.float64)
    sun = motion.sun[y0:y1, x0:x1].astype(np.float64)
    d_sensor = 1.0 - np.percentile(gain[r], 5) / max(np.median(gain[ring]), 1e-9)
    d_sun = 1.0 - np.percentile(sun[swept], 5) / max(np.median(sun[sun_ring]), 1e-9)
    noise = float(np.median(motion.sigma[y0:y1, x0:x1][r]))
    a, b = max(d_sensor, 0.0), max(d_sun, 0.0)
    score = None if a + b <= 0 else a / (a + b)
    return {"stationarity": None if score is None else _round(score, 3), "d_sensor": _round(d_sensor),
            "d_sun": _round(d_sun), "z_sensor": _round(d_sensor / max(noise, 1e-9), 2)}


def blend_gains(motion_gain: np.ndarray, weight: np.ndarray, other_gain: np.ndarray,
                feather_px: float = 3.0) -> np.ndarray:
    """Motion gain where the motion constrains it, *other_gain* where it does not.

    Parameters
    ----------
    motion_gain, other_gain : ndarray (H, W)
        Gains, 1.0 = no attenuation (e.g. ``MotionFlat.gain`` and the
        inpainting route's ``reference / inpainted``).
    weight : ndarray (H, W), bool or float in [0, 1]
        Trust in the motion gain (``MotionFlat.support``). A boolean support
        becomes 0 outside it, rising smoothly (smoothstep of the distance) to
        exactly 1 at ``2 * feather_px`` inside, so the two meet without a seam.

    Returns
    -------
    numpy.ndarray
        float32 ``w * motion + (1 - w) * other``.
    """
    w = _support_weight(weight, feather_px)
    a = np.asarray(motion_gain, dtype=np.float32)
    b = np.asarray(other_gain, dtype=np.float32)
    if not (a.shape == b.shape == w.shape):
        raise ValueError(f"shapes differ: motion {a.shape}, other {b.shape}, weight {w.shape}")
    return (w * a + (1 - w) * b).astype(np.float32)


def _support_weight(weight: np.ndarray, feather_px: float) -> np.ndarray:
    """Trust in the motion gain, float32 in [0, 1] (see :func:`blend_gains`).

    A boolean support becomes 0 outside it, rising smoothly (smoothstep of
    the distance) to exactly 1 at ``2 * feather_px`` inside; a float weight is
    clipped to [0, 1].
    """
    w = np.asarray(weight)
    if w.dtype == bool:
        if feather_px > 0:
            t = np.clip(ndimage.distance_transform_edt(w) / (2.0 * feather_px), 0.0, 1.0)
            w = t * t * (3.0 - 2.0 * t)
        else:
            w = w.astype(np.float32)
    return np.clip(w, 0.0, 1.0).astype(np.float32)


def motion_soft_mask(
    motion: MotionFlat,
    mask: np.ndarray,
    *,
    reach_px: float = 3.0,
    z_low: float = 2.0,
    z_high: float = 4.0,
    scale_px: float = 1.0,
    outside: np.ndarray | None = None,
    feather_px: float = 3.0,
) -> np.ndarray:
    """The flat builder's weight on the motion route: where the motion gain departs from 1 beyond its noise.

    An appearance-style soft mask (the detected dust dilated by a fixed disk
    and feathered) spends its ring on pixels whose gain is indistinguishable
    from 1; the motion route knows the gain and its noise there, so its ring
    follows the evidence instead. Within *reach_px* of the detected *mask*
    the weight is a smoothstep of the significance ``z = |log g_s| / noise``
    of the gain smoothed by *scale_px* (as in :func:`evidence_mask`): 0 up to
    *z_low* (the flat stays exactly 1.0 there), 1 from *z_high*; on the mask
    it is 1; farther out 0. Where the gain is no longer significant the flat
    has already come to within ``z_low`` noise of 1, so the edge needs no
    wider feather.

    Where the motion does not constrain the gain (outside
    ``motion.support``, where :func:`blend_gains` takes the other route's
    gain) *outside* is used instead (e.g. ``flat.soft_mask(mask, 3, 1.5)``;
    default: the mask itself), the two blended over the same smooth
    transition as the gains (*feather_px*).

    Parameters
    ----------
    motion : MotionFlat
    mask : ndarray, bool (H, W)
        The detected dust.
    reach_px, z_low, z_high, scale_px, outside, feather_px
        See above. Defaults: reach 3 px (the motion route's former fixed
        expansion), z 2-4 and scale 1 px, chosen on the simulator
        (``benchmarks/flats.py``): the share of pixels exactly 1.0 rises
        from 0.79 to 0.86 (25 dust on 480 x 640) and from 0.89 to 0.93 (12)
        with the flat errors in dust and its wings unchanged within 0.01 %.

    Returns
    -------
    numpy.ndarray
        float32 ``(H, W)`` weight in [0, 1], exactly 1 on *mask*, exactly 0
        where the flat must be exactly 1.0.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != motion.gain.shape:
        raise ValueError(f"mask shape {mask.shape} != gain shape {motion.gain.shape}")
    if outside is None:
        outside = mask.astype(np.float32)
    outside = np.asarray(outside, dtype=np.float32)
    if not motion.used or not motion.support.any():
        return np.maximum(outside, mask).astype(np.float32)
    support = motion.support
    w = mask.astype(np.float32)
    if mask.any() and reach_px > 0:
        from .flat import expand_mask

        ring = expand_mask(mask, reach_px) & ~mask
        g = np.log(np.maximum(motion.gain.astype(np.float64), 1e-6))
        elevation = _elevation(motion.sigma, support)
        clean = support & ~ndimage.binary_dilation(mask, iterations=4)
        if clean.sum() < 100:
            clean = support
        _, z = _significance(g, scale_px, _typical(clean, elevation), elevation)
        t = np.clip((z[ring] - z_low) / max(z_high - z_low, 1e-6), 0.0, 1.0)
        w[ring] = t * t * (3.0 - 2.0 * t)
    b = _support_weight(support, feather_px)
    out = b * w + (1.0 - b) * outside
    out[mask] = 1.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)

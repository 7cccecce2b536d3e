"""Deterministic PDE inpainters: harmonic (Laplace) and biharmonic fill.

Both solve a sparse linear system per connected masked region, on a small
crop around that region, so the cost scales with the masked area, not with the
image size. Pixels outside the mask are returned bit-for-bit unchanged.

``harmonic``
    Discrete Laplace equation (5-point stencil) inside each region, Dirichlet
    boundary = the known pixels around it. Reproduces any linear ramp exactly.
    Smooth, never overshoots (maximum principle), blurs structure.
``biharmonic``
    Least-squares minimum of the squared discrete Laplacian (13-point
    biharmonic stencil inside the image; the same equation skimage's
    ``inpaint_biharmonic`` solves), which continues gradients and curvature
    across the hole. Reproduces any quadratic exactly away from the image
    border. May overshoot slightly near strong edges.

At the image border the harmonic fill's Laplacian only uses neighbours that
exist (a zero-flux, Neumann-like condition: the fill flattens towards the
border); the biharmonic fill switches to one-sided second differences there,
so it continues a gradient up to the border (linear ramps exact, border
included). Non-finite pixels outside the mask are treated like pixels outside
the image: never used, never changed.

Large regions: a biharmonic region with more than ``max_biharmonic``
unknowns is filled harmonically (stated in the result's params as
``n_regions_fallback``); a harmonic region with more than ``max_direct``
unknowns is solved coarse-to-fine (the region is solved at half resolution,
recursively, upsampled, and refined with conjugate gradients at full
resolution) instead of by a sparse direct factorisation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import linalg as splinalg

from ..errors import InputError
from .base import INPAINTERS, InpaintResult, check_inputs

_EIGHT = np.ones((3, 3), dtype=bool)
_SHIFTS = ((-1, 0), (1, 0), (0, -1), (0, 1))


# --------------------------------------------------------------------------- crop helpers
def _shifted(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``out[y, x] = a[y + dy, x + dx]``, *fill* where that falls outside *a*."""
    out = np.full_like(a, fill)
    h, w = a.shape
    ys_dst = slice(max(0, -dy), h - max(0, dy))
    xs_dst = slice(max(0, -dx), w - max(0, dx))
    ys_src = slice(max(0, dy), h - max(0, -dy))
    xs_src = slice(max(0, dx), w - max(0, -dx))
    out[ys_dst, xs_dst] = a[ys_src, xs_src]
    return out


def _laplacian(node: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Graph Laplacian over the True pixels of *node* (4-neighbours that are nodes).

    Returns the ``(n, n)`` matrix ``(L u)_p = sum_q (u_q - u_p)`` and the index
    image (``-1`` where not a node).
    """
    idx = np.full(node.shape, -1, dtype=np.int64)
    n = int(np.count_nonzero(node))
    idx[node] = np.arange(n)
    rows, cols = [], []
    deg = np.zeros(node.shape, dtype=np.float64)
    for dy, dx in _SHIFTS:
        nb = _shifted(idx, dy, dx, -1)
        ok = node & (nb >= 0)
        rows.append(idx[ok])
        cols.append(nb[ok])
        deg += ok
    rows.append(idx[node])
    cols.append(idx[node])
    vals = np.concatenate([np.ones(sum(r.size for r in rows[:-1])), -deg[node]])
    lap = sparse.csr_matrix((vals, (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    return lap, idx


def _within_boundary_range(vals: np.ndarray, crop: np.ndarray, unknown: np.ndarray, valid: np.ndarray) -> bool:
    """Is a fill within the range of its known surroundings, widened by that range on each side?

    The surroundings are the known pixels within 3 px of the region (the
    biharmonic stencil's reach). A fill may overshoot them (it continues
    gradients) but not by more than their own spread.
    """
    ring = ndimage.binary_dilation(unknown, _EIGHT, iterations=3) & valid
    if not ring.any() or not np.all(np.isfinite(vals)):
        return bool(ring.any())
    lo, hi = float(crop[ring].min()), float(crop[ring].max())
    span = hi - lo
    return bool(vals.min() >= lo - span and vals.max() <= hi + span)


def _solve_spd(a: sparse.spmatrix, b: np.ndarray) -> np.ndarray:
    """Sparse direct solve of a symmetric positive definite system."""
    if a.shape[0] == 1:
        return b / a.toarray()[0, 0]
    lu = splinalg.splu(sparse.csc_matrix(a), permc_spec="MMD_AT_PLUS_A")
    return lu.solve(b)


def _harmonic_system(img: np.ndarray, unknown: np.ndarray, valid: np.ndarray):
    """Laplace system restricted to *unknown*; knowns (valid & ~unknown) as Dirichlet data."""
    node = valid | unknown
    lap, idx = _laplacian(node)
    u_ids = idx[unknown]
    k_ids = idx[node & ~unknown]
    a = lap[u_ids][:, u_ids]
    b = -(lap[u_ids][:, k_ids] @ img[node & ~unknown])
    return -a, -b  # -L is positive definite on the unknowns


def _second_differences(node: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray]:
    """Discrete Laplacian ``d2/dy2 + d2/dx2`` over the True pixels of *node*.

    Each second difference is centred where both neighbours are nodes, and
    one-sided (``u[r] - 2 u[r+1] + u[r+2]`` or the mirror) where the pixel sits
    against the image border or a non-node pixel, so that linear ramps have a
    zero Laplacian everywhere, border included. Returns the ``(n, n)`` matrix
    and the index image (``-1`` where not a node).
    """
    idx = np.full(node.shape, -1, dtype=np.int64)
    n = int(np.count_nonzero(node))
    idx[node] = np.arange(n)
    rows, cols, vals = [], [], []

    def add(sel, *terms):
        r = idx[sel]
        for col_img, v in terms:
            rows.append(r)
            cols.append(col_img[sel])
            vals.append(np.full(r.size, v, dtype=np.float64))

    for dy, dx in ((1, 0), (0, 1)):
        nxt, nxt2 = _shifted(idx, dy, dx, -1), _shifted(idx, 2 * dy, 2 * dx, -1)
        prv, prv2 = _shifted(idx, -dy, -dx, -1), _shifted(idx, -2 * dy, -2 * dx, -1)
        centred = node & (prv >= 0) & (nxt >= 0)
        forward = node & ~centred & (nxt >= 0) & (nxt2 >= 0)
        backward = node & ~centred & ~forward & (prv >= 0) & (prv2 >= 0)
        add(centred, (prv, 1.0), (idx, -2.0), (nxt, 1.0))
        add(forward, (idx, 1.0), (nxt, -2.0), (nxt2, 1.0))
        add(backward, (idx, 1.0), (prv, -2.0), (prv2, 1.0))
    op = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                           shape=(n, n))
    return op, idx


def _biharmonic_system(img: np.ndarray, unknown: np.ndarray, node: np.ndarray):
    """Normal equations of ``min ||L u||^2`` over the unknowns (L: :func:`_second_differences`)."""
    lap, idx = _second_differences(node)
    lap = lap.tocsc()
    known = node & ~unknown
    l_u = lap[:, idx[unknown]]
    l_k = lap[:, idx[known]]
    a = (l_u.T @ l_u).tocsc()
    b = -(l_u.T @ (l_k @ img[known]))
    return a, b


def _downsample(img: np.ndarray, unknown: np.ndarray, valid: np.ndarray):
    """Half-resolution crop: a coarse pixel is unknown when all its fine pixels are."""
    h, w = img.shape
    hp, wp = h + h % 2, w + w % 2
    pad = ((0, hp - h), (0, wp - w))
    known = np.pad(valid & ~unknown, pad)
    unk = np.pad(unknown, pad, constant_values=True)
    vals = np.pad(np.where(valid & ~unknown, img, 0.0), pad)

    def blocks(a):
        return a.reshape(hp // 2, 2, wp // 2, 2)

    n_known = blocks(known).sum(axis=(1, 3))
    total = blocks(vals).sum(axis=(1, 3))
    c_unknown = blocks(unk).all(axis=(1, 3)) & (n_known == 0)
    c_valid = n_known > 0
    c_img = np.where(c_valid, total / np.maximum(n_known, 1), 0.0)
    return c_img, c_unknown, c_valid


def _harmonic_fill(img, unknown, valid, max_direct: int, tol: float) -> np.ndarray:
    """Harmonic values at the unknown pixels (direct, or coarse-to-fine + CG)."""
    a, b = _harmonic_system(img, unknown, valid)
    n = b.size
    if n <= max_direct:
        return _solve_spd(a, b)
    c_img, c_unk, c_valid = _downsample(img, unknown, valid)
    coarse = c_img.copy()
    if c_unk.any():
        coarse[c_unk] = _harmonic_fill(c_img, c_unk, c_valid, max_direct, tol)
    guess_full = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)[: img.shape[0], : img.shape[1]]
    guess_full = ndimage.uniform_filter(guess_full, size=3, mode="nearest")
    x0 = guess_full[unknown]
    return _jacobi_cg(a.tocsr(), b, x0, tol, maxiter=20 * int(np.sqrt(n)) + 100)


def _jacobi_cg(a: sparse.csr_matrix, b: np.ndarray, x: np.ndarray, tol: float,
               maxiter: int) -> np.ndarray:
    """Jacobi-preconditioned conjugate gradients for a symmetric positive definite *a*.

    Written with element-wise numpy only (no BLAS dot products), so it does
    not stall when BLAS threads compete for a few busy cores.
    """
    inv_d = 1.0 / a.diagonal()
    r = b - a @ x
    z = r * inv_d
    p = z.copy()
    rz = float((r * z).sum())
    stop = (tol * float(np.sqrt((b * b).sum()))) ** 2
    for _ in range(maxiter):
        if float((r * r).sum()) <= stop:
            break
        ap = a @ p
        alpha = rz / float((p * ap).sum())
        x = x + alpha * p
        r = r - alpha * ap
        z = r * inv_d
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


# --------------------------------------------------------------------------- inpainters
@dataclass
class _PDEInpainter:
    """Shared region loop of the harmonic and biharmonic inpainters."""

    max_direct: int = 250_000
    max_biharmonic: int = 40_000
    cg_tol: float = 1e-8

    name = "pde"
    order = 1  # 1 harmonic, 2 biharmonic

    def params(self) -> dict:
        return {"backend": self.name, "max_direct": int(self.max_direct),
                "max_biharmonic": int(self.max_biharmonic), "cg_tol": float(self.cg_tol)}

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> InpaintResult:
        """Fill the True pixels of *mask*.

        Parameters
        ----------
        image : numpy.ndarray
            ``(H, W)`` image, any real dtype (computed in float64, returned float32).
        mask : numpy.ndarray
            ``(H, W)`` boolean (or 0/1) mask, True = fill.

        Returns
        -------
        InpaintResult
            ``image`` float32: equal to ``image.astype(float32)`` outside the
            mask, bit for bit. ``params`` records the backend, parameters,
            region counts and the solve time in seconds.
        """
        t0 = time.perf_counter()
        img, m = check_inputs(image, mask, "2-D")
        out = img.astype(np.float32, copy=True)
        params = self.params()
        params.update(n_regions=0, n_pixels=int(np.count_nonzero(m)), n_regions_fallback=0,
                      n_regions_unsolved=0)
        if not m.any():
            params["seconds"] = time.perf_counter() - t0
            return InpaintResult(out, params)
        if m.all():
            raise InputError("mask covers the whole image: there is nothing to inpaint from")

        pad = 3 if self.order == 2 else 1
        # Regions close enough to share a stencil are solved together.
        groups, n_groups = ndimage.label(ndimage.binary_dilation(m, _EIGHT) if pad == 2 else m,
                                         structure=_EIGHT)
        h, w = img.shape
        for g, sl in enumerate(ndimage.find_objects(groups), start=1):
            if sl is None:
                continue
            y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
            x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
            crop = img[y0:y1, x0:x1].astype(np.float64)
            unknown = m[y0:y1, x0:x1] & (groups[y0:y1, x0:x1] == g)
            if not unknown.any():
                continue
            valid = np.isfinite(crop) & ~m[y0:y1, x0:x1]
            crop = np.where(valid, crop, 0.0)
            params["n_regions"] += 1
            if not self._has_boundary(unknown, valid):
                out[y0:y1, x0:x1][unknown] = np.nan
                params["n_regions_unsolved"] += 1
                continue
            n_unknown = int(np.count_nonzero(unknown))
            if self.order == 2 and n_unknown <= self.max_biharmonic:
                # Every masked pixel is a node (as in the whole-image problem), so
                # stencil choices near other regions match; the grouping above
                # guarantees no row touching this region reaches another one.
                node = valid | m[y0:y1, x0:x1]
                a, b = _biharmonic_system(crop, unknown, node)
                vals = _solve_spd(a, b)
                if not _within_boundary_range(vals, crop, unknown, valid):
                    # Continuing gradients across a large region (worst where it
                    # touches the image border) can overshoot far beyond anything
                    # around it; the harmonic fill obeys the maximum principle.
                    params["n_regions_fallback"] += 1
                    params["n_regions_overshoot"] = params.get("n_regions_overshoot", 0) + 1
                    vals = _harmonic_fill(crop, unknown, valid, self.max_direct, self.cg_tol)
            else:
                if self.order == 2:
                    params["n_regions_fallback"] += 1
                vals = _harmonic_fill(crop, unknown, valid, self.max_direct, self.cg_tol)
            out[y0:y1, x0:x1][unknown] = vals.astype(np.float32)
        params["seconds"] = time.perf_counter() - t0
        return InpaintResult(out, params)

    @staticmethod
    def _has_boundary(unknown: np.ndarray, valid: np.ndarray) -> bool:
        """Does the region touch at least one usable known pixel (4-neighbour)?"""
        grown = ndimage.binary_dilation(unknown, ndimage.generate_binary_structure(2, 1))
        return bool((grown & valid).any())


@INPAINTERS.register("harmonic", "Laplace fill per masked region (smooth, exact for ramps)")
@dataclass
class HarmonicInpainter(_PDEInpainter):
    """Harmonic (Laplace equation) inpainting, one sparse solve per region.

    Parameters
    ----------
    max_direct : int
        Regions with more unknown pixels than this are solved coarse-to-fine
        with conjugate gradients instead of a sparse LU factorisation.
    max_biharmonic : int
        Unused here (kept so both inpainters share one parameter set).
    cg_tol : float
        Relative residual tolerance of the conjugate-gradient refinement.
    """

    name = "harmonic"
    order = 1


@INPAINTERS.register("biharmonic",
                     "biharmonic fill per masked region (continues gradients; exact for "
                     "quadratics)")
@dataclass
class BiharmonicInpainter(_PDEInpainter):
    """Biharmonic inpainting, one sparse solve per region.

    Parameters
    ----------
    max_direct : int
        See :class:`HarmonicInpainter` (used for fallback regions).
    max_biharmonic : int
        Regions with more unknown pixels than this are filled harmonically
        (the biharmonic factorisation grows much faster with size); counted
        in ``params["n_regions_fallback"]``.
    cg_tol : float
        See :class:`HarmonicInpainter`.
    """

    name = "biharmonic"
    order = 2

"""The dustnet network, its input normalisation, and its weight files (torch side).

Imported only when the ``dustnet`` masker runs or the model is trained
(:mod:`aiflat_local.train`): this module imports torch.

The network
-----------
A compact U-Net (Ronneberger et al. 2015) sized for a CPU: one level per
entry of ``channels`` (default 12, 20, 32, 48: channels grow slower than the
usual doubling, which keeps the cost per pixel low), each two 3 x 3
convolutions (batch norm, ReLU), max-pooling down, bilinear upsampling and concatenated skips up, a
1 x 1 convolution to one dust logit per pixel. Batch norm is used because at
inference it is a fixed per-channel affine map, so a tile's output does not
depend on the tile's own statistics (no seams). The receptive field of the
default (4 levels) is 96 px; the input normalisation below supplies the
larger-scale context (the local background).

The input
---------
:func:`prepare_input` turns a reference image (any linear units) into two
channels that do not depend on the exposure or the image's units:

0. relative contrast ``image / background - 1``, clipped to +-0.6 and scaled
   by ``CONTRAST_SCALE`` (a 1 % dip is -0.08), where the background is a
   median over about ``background_px`` px computed at reduced resolution
   (dust shadows much smaller than that window do not bias it);
1. log brightness of that background relative to the disk level (the 99th
   percentile of the background), clipped to [-5, 0.5]: tells the disk from
   the sky beyond the limb, where the relative contrast is only noise.

Weight files
------------
A model directory holds ``model.safetensors`` (the state dict; the
architecture is repeated in the safetensors metadata under ``"config"``) and
``card.json`` (architecture, training recipe, seed, metrics, sha256, versions).
Only safetensors is read: no pickle is ever unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F

from ..errors import WeightsError

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
ARCHITECTURE = "dustnet-unet"
CONTRAST_SCALE = 8.0
CONTRAST_CLIP = 0.6
LEVEL_CLIP = (-5.0, 0.5)


# --------------------------------------------------------------------------- input
def _block_mean(img: np.ndarray, f: int) -> np.ndarray:
    h, w = img.shape
    hp, wp = -(-h // f) * f, -(-w // f) * f
    a = np.pad(img, ((0, hp - h), (0, wp - w)), mode="edge")
    return a.reshape(hp // f, f, wp // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _upsample(coarse: np.ndarray, f: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling of a block-reduced image to *shape* (pixel centres aligned)."""
    ch, cw = coarse.shape

    def axis(n_out: int, n_in: int):
        t = np.clip((np.arange(n_out) + 0.5) / f - 0.5, 0, n_in - 1)
        i0 = np.floor(t).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, (t - i0).astype(np.float32)

    y0, y1, wy = axis(shape[0], ch)
    x0, x1, wx = axis(shape[1], cw)
    rows = coarse[y0] * (1 - wy)[:, None] + coarse[y1] * wy[:, None]
    return (rows[:, x0] * (1 - wx)[None, :] + rows[:, x1] * wx[None, :]).astype(np.float32)


def background(image: np.ndarray, background_px: float = 128.0) -> np.ndarray:
    """Large-scale background of *image*: a median over ~*background_px* px, float32 ``(H, W)``.

    Computed on ``f x f`` block means (``f = background_px / 8``) with a 9 x 9
    median, then bilinearly upsampled: a few milliseconds for 1920 x 1200.
    """
    f = max(1, int(round(background_px / 8)))
    coarse = _block_mean(np.asarray(image, np.float32), f)
    size = max(1, min(9, *coarse.shape))
    coarse = ndimage.median_filter(coarse, size=size, mode="reflect")
    return _upsample(coarse, f, image.shape)


def prepare_input(image: np.ndarray, background_px: float = 128.0) -> np.ndarray:
    """The network's two input channels for a reference image: float32 ``(2, H, W)``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` reference image (temporal median), any linear units; NaN and
        infinities are replaced by the median of the finite pixels.
    background_px : float
        Size (px) of the median window of the background estimate.

    Returns
    -------
    numpy.ndarray
        Channel 0: relative contrast ``image / background - 1`` (clipped to
        +-0.6) x 8; channel 1: ``log(background / disk level)`` clipped to
        [-5, 0.5]. See the module documentation. An image without signal
        (its background's 99th percentile <= 0) gives zeros.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {img.shape}")
    bad = ~np.isfinite(img)
    if bad.any():
        img = img.copy()
        img[bad] = np.median(img[~bad]) if (~bad).any() else 0.0
    bg = background(img, background_px)
    level = float(np.percentile(bg, 99))
    if not np.isfinite(level) or level <= 0:  # no signal (e.g. all zero): nothing to see
        return np.zeros((2,) + img.shape, np.float32)
    floor = 0.01 * level
    safe = np.maximum(bg, floor)
    contrast = np.clip(img / safe - 1.0, -CONTRAST_CLIP, CONTRAST_CLIP) * CONTRAST_SCALE
    log_level = np.clip(np.log(safe / level), *LEVEL_CLIP)
    return np.stack([contrast, log_level]).astype(np.float32)


# --------------------------------------------------------------------------- network
@dataclass
class DustNetConfig:
    """Architecture of a dustnet U-Net (saved with the weights).

    Attributes
    ----------
    in_channels : int
        Input channels (2: see :func:`prepare_input`).
    channels : tuple of int
        Channels at each resolution level, full resolution first; there are
        ``len(channels) - 1`` poolings, and inputs are padded to a multiple of
        ``2 ** (len(channels) - 1)``.
    background_px : float
        Background window of :func:`prepare_input` the model was trained with.
    """

    in_channels: int = 2
    channels: tuple[int, ...] = (12, 20, 32, 48)
    background_px: float = 128.0

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        if not self.channels or min(self.channels) < 1:
            raise ValueError("channels must be a non-empty list of positive integers")

    @property
    def depth(self) -> int:
        return len(self.channels)

    @property
    def multiple(self) -> int:
        return 2 ** (self.depth - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return {"architecture": ARCHITECTURE, **d}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DustNetConfig":
        arch = data.get("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise WeightsError(f"unknown dustnet architecture {arch!r} (expected {ARCHITECTURE!r})")
        names = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"invalid dustnet architecture {data!r} ({exc})") from None


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, padding_mode="reflect", bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
    )


class DustUNet(nn.Module):
    """Compact U-Net: ``(N, in_channels, H, W)`` -> dust logits ``(N, 1, H, W)``.

    ``H`` and ``W`` must be multiples of ``config.multiple`` (see :func:`predict_logits`).
    """

    def __init__(self, config: DustNetConfig) -> None:
        super().__init__()
        self.config = config
        chans = list(config.channels)
        self.down = nn.ModuleList()
        c_prev = config.in_channels
        for c in chans:
            self.down.append(_block(c_prev, c))
            c_prev = c
        self.up = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(_block(c_prev + c, c))
            c_prev = c
        self.head = nn.Conv2d(c_prev, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def build_model(config: DustNetConfig | None = None, seed: int | None = None) -> DustUNet:
    """A new, randomly initialised model (seeded if *seed* is given), in eval mode."""
    config = config or DustNetConfig()
    if seed is not None:
        torch.manual_seed(seed)
    return DustUNet(config).eval()


def n_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


# --------------------------------------------------------------------------- tiled inference
def _window(n: int, overlap: int, start_edge: bool, stop_edge: bool) -> np.ndarray:
    """1-D blending weight of a tile of *n* px: 1 inside, ramps at its inner edges, 1 at image edges.

    Over the *overlap* px at an inner edge the weight is ~0 for the outer
    quarter (where the network lacks context), rises as a raised cosine over
    the middle half and is 1 for the inner quarter; the ramps of two tiles
    that overlap by exactly *overlap* px sum to 1. A floor of 1e-4 keeps every
    pixel weighted.
    """
    w = np.ones(n, np.float64)
    if overlap > 0:
        m = overlap // 4
        u = np.arange(overlap, dtype=np.float64) + 0.5
        r = 0.5 - 0.5 * np.cos(np.pi * np.clip((u - m) / max(overlap - 2 * m, 1), 0.0, 1.0))
        r = np.maximum(r, 1e-4)
        if not start_edge:
            w[:overlap] = r
        if not stop_edge:
            w[n - overlap:] = np.minimum(w[n - overlap:], r[::-1])
    return w


def _starts(n: int, tile: int, step: int, mult: int) -> list[int]:
    """Tile starts along one axis: multiples of *mult* (the network's pooling stride), so every
    tile pools on the same grid as the whole image would; the last tile reaches the image edge."""
    if n <= tile:
        return [0]
    step = max(mult, step // mult * mult)
    last = (n - tile) // mult * mult
    out = list(range(0, last, step))
    out.append(last)
    return sorted(set(out))


def predict_logits(model: DustUNet, inputs: np.ndarray, *, tile: int = 512, overlap: int = 96,
                   device: str = "cpu", dtype: str = "float32") -> np.ndarray:
    """Dust logits for a prepared input ``(C, H, W)``: float32 ``(H, W)``, tiled with overlap.

    Each tile (about ``tile x tile`` px, starting on a multiple of the
    network's stride so that it pools on the same grid as the whole image) is
    run on its own; neighbouring tiles overlap by
    at least *overlap* px and are blended with weights that fall to ~0 towards
    their inner edges (see :func:`_window`), so tile borders (where the
    network sees no context) do not count and no seam appears. ``tile <= 0``
    runs the whole image at once.
    """
    model.eval()
    if str(device) == "cpu":  # oneDNN convolutions are ~1.5x faster in channels-last layout
        model.to(memory_format=torch.channels_last)
    c, h, w = inputs.shape
    mult = model.config.multiple
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    if tile <= 0 or (h <= tile and w <= tile):
        return _run(model, inputs, mult, device, torch_dtype)
    tile = max(int(tile) // mult * mult, 2 * int(overlap) + mult, mult)
    overlap = max(0, min(int(overlap), tile // 2))
    step = tile - overlap
    acc = np.zeros((h, w), np.float64)
    wsum = np.zeros((h, w), np.float64)
    ys, xs = _starts(h, tile, step, mult), _starts(w, tile, step, mult)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            y1 = h if i == len(ys) - 1 else min(y0 + tile, h)
            x1 = w if j == len(xs) - 1 else min(x0 + tile, w)
            out = _run(model, inputs[:, y0:y1, x0:x1], mult, device, torch_dtype)
            wy = _window(y1 - y0, overlap, y0 == 0, y1 == h)
            wx = _window(x1 - x0, overlap, x0 == 0, x1 == w)
            wt = wy[:, None] * wx[None, :]
            acc[y0:y1, x0:x1] += wt * out
            wsum[y0:y1, x0:x1] += wt
    return (acc / wsum).astype(np.float32)


def _run(model: DustUNet, x: np.ndarray, mult: int, device: str, dtype) -> np.ndarray:
    _, h, w = x.shape
    # a multiple of the stride, and at least 2 px at the coarsest level (reflect padding needs 2)
    ph, pw = max((-h) % mult, 2 * mult - h), max((-w) % mult, 2 * mult - w)
    t = torch.from_numpy(np.ascontiguousarray(x))[None]
    if ph or pw:
        mode = "reflect" if (h > ph and w > pw) else "replicate"
        t = F.pad(t, (0, pw, 0, ph), mode=mode)
    t = t.to(device=device, dtype=dtype)
    if str(device) == "cpu":
        t = t.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = model(t)
    return out[0, 0, :h, :w].float().cpu().numpy()


# --------------------------------------------------------------------------- files
def save_model(model: DustUNet, directory: str | Path, card: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``card.json`` into *directory*; return the card written.

    The card gets ``architecture`` (the config), ``n_parameters``, ``files``
    (sha256 of the safetensors file) and whatever *card* holds besides.
    """
    from safetensors.torch import save_file

    from ..weights import sha256_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().float() if v.is_floating_point() else v.detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    path = directory / WEIGHTS_FILE
    tmp = directory / (WEIGHTS_FILE + ".part")
    save_file(state, str(tmp), metadata={"config": json.dumps(model.config.to_dict()), "format": "pt"})
    tmp.replace(path)
    _normal_permissions(path)
    out = dict(card or {})
    out["architecture"] = model.config.to_dict()
    out["n_parameters"] = n_parameters(model)
    out["files"] = {WEIGHTS_FILE: {"sha256": sha256_file(path), "bytes": path.stat().st_size}}
    return write_card(directory, out)


def write_card(directory: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write *card* as ``card.json`` into *directory* (renamed into place when complete); return it."""
    directory = Path(directory)
    tmp_card = directory / (CARD_FILE + ".part")
    tmp_card.write_text(json.dumps(card, indent=1))
    tmp_card.replace(directory / CARD_FILE)
    _normal_permissions(directory / CARD_FILE)
    return card


def _normal_permissions(path: Path) -> None:
    """``rw-r--r--`` under the usual umask (safetensors creates its files ``rw-------``)."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def load_model(directory: str | Path, *, device: str = "cpu", dtype: str = "float32") -> DustUNet:
    """Load a model directory written by :func:`save_model` (safetensors only), in eval mode.

    Raises :class:`~aiflat_local.errors.WeightsError` with one line when the
    file is missing, unreadable or does not match the architecture it declares.
    """
    from safetensors import safe_open

    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise WeightsError(f"dustnet weights not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    if "config" not in meta:
        card = Path(directory) / CARD_FILE
        if not card.is_file():
            raise WeightsError(f"{path}: no architecture in its metadata and no {CARD_FILE} beside it")
        meta_config = json.loads(card.read_text()).get("architecture", {})
    else:
        meta_config = json.loads(meta["config"])
    config = DustNetConfig.from_dict(meta_config)
    model = DustUNet(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "state dict mismatch"
        raise WeightsError(f"{path}: weights do not match the declared architecture ({first})") from None
    torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
    return model.to(device=device, dtype=torch_dtype).eval()


def receptive_field_px(config: DustNetConfig) -> int:
    """Theoretical receptive field (px) of the network: two 3x3 convolutions per level and per decoder stage."""
    rf, jump = 1, 1
    for level in range(config.depth):
        if level:
            rf += jump  # 2x2 max-pool
            jump *= 2
        rf += 4 * jump
    for _ in range(config.depth - 1):
        jump //= 2
        rf += 4 * jump
    return int(rf)


__all__ = ["DustNetConfig", "DustUNet", "build_model", "prepare_input", "background", "predict_logits",
           "save_model", "load_model", "n_parameters", "receptive_field_px", "WEIGHTS_FILE", "CARD_FILE"]

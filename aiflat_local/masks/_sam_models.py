"""SAM-family models from local files, run one image window at a time.

A *backend* hides the differences between the model families behind three
calls:

- ``embed(window)`` -> the image embedding of one window (computed once,
  reused for every prompt batch of that window);
- ``predict(embedding, points=..., boxes=..., multimask=...)`` -> masks and
  scores for a batch of point or box prompts;
- ``predict_text(embedding, prompts, threshold=...)`` -> instance masks for
  text prompts (SAM 3 only).

Windows are float32 ``(h, w)`` images in [0, 1] (the masker's display
stretch), replicated to three channels. Preprocessing is done here with
torch, not with the transformers image processors (the SAM 2 / SAM 3 ones need
torchvision): SAM v1/HQ resize the long side to the model's input size and pad
(bottom/right), SAM 2/3 stretch the window to the square input; then
``(x - mean) / std``. Masks come back at the window's own resolution.

Coordinates: ``points`` are ``(x, y)`` in window pixels where pixel ``(r, c)``
spans ``[c, c+1) x [r, r+1)`` (its centre is ``(c + 0.5, r + 0.5)``); boxes
are ``(x0, y0, x1, y1)`` edges in the same continuous coordinates.

Supported folders (``config.json`` ``model_type``): ``sam`` (SamModel),
``sam_hq`` (SamHQModel), ``sam2`` / ``sam2_video`` (Sam2Model), ``sam3_video``
(the full ``facebook/sam3``: Sam3Model for text, Sam3TrackerModel for points
and boxes), ``sam3`` (detector only: text), ``sam3_tracker`` (points/boxes).
A checkpoint *file* is Meta's SAM v1 format: converted to SamModel
(:mod:`._sam_convert`), or run by Meta's ``segment_anything`` package when it
imports (it needs torchvision).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..errors import BackendError, WeightsError
from ..weights import ResolvedModel, load_pretrained, load_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF_MEAN = (0.5, 0.5, 0.5)
DTYPES = ("float32", "float16")

# model_type -> (family, transformers class name, prompt kinds it serves)
_FOLDER_TYPES: dict[str, tuple[str, str, frozenset[str]]] = {
    "sam": ("sam", "SamModel", frozenset({"points", "boxes"})),
    "sam_hq": ("sam_hq", "SamHQModel", frozenset({"points", "boxes"})),
    "sam2": ("sam2", "Sam2Model", frozenset({"points", "boxes"})),
    "sam2_video": ("sam2", "Sam2Model", frozenset({"points", "boxes"})),
    "sam3_tracker": ("sam3_tracker", "Sam3TrackerModel", frozenset({"points", "boxes"})),
    "sam3_tracker_video": ("sam3_tracker", "Sam3TrackerModel", frozenset({"points", "boxes"})),
}


@dataclass
class Prediction:
    """Masks for a batch of prompts, at the window's resolution.

    Attributes
    ----------
    masks : numpy.ndarray
        bool ``(n, k, h, w)``: ``k`` candidate masks for each of ``n`` prompts
        (``k = 1`` for boxes and text instances).
    scores : numpy.ndarray
        float32 ``(n, k)``: the model's own quality score (predicted IoU for
        SAM, detection score for SAM 3 text).
    prompt_index : numpy.ndarray or None
        For text: which prompt each instance answers.
    """

    masks: np.ndarray
    scores: np.ndarray
    prompt_index: np.ndarray | None = None


# --------------------------------------------------------------------------- devices
def check_device_string(device: str) -> None:
    """Cheap validation of a device name (no torch import): ``cpu``, ``cuda`` or ``cuda:N``."""
    d = str(device)
    if not (d == "cpu" or d == "cuda" or (d.startswith("cuda:") and d[5:].isdigit())):
        raise BackendError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")


def check_dtype_string(dtype: str, device: str) -> None:
    """float32 anywhere, float16 on CUDA only (no torch import)."""
    if dtype not in DTYPES:
        raise BackendError(f"dtype {dtype!r} is not supported: use {' or '.join(DTYPES)}")
    if dtype == "float16" and not str(device).startswith("cuda"):
        raise BackendError("half precision (dtype float16) runs on CUDA only; use dtype float32 on the CPU")


def torch_device(device: str):
    """``torch.device`` for *device*, or one clear error when CUDA is asked for and absent."""
    import torch

    check_device_string(device)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendError(f"device {device!r} requested but torch {torch.__version__} sees no CUDA device "
                               f"here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackendError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    return dev


def torch_dtype(dtype: str, device: str):
    import torch

    check_dtype_string(dtype, device)
    return torch.float16 if dtype == "float16" else torch.float32


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' log lines and progress bars while loading (restored afterwards)."""
    from transformers.utils import logging as tlog

    level = tlog.get_verbosity()
    bars = tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Preprocess:
    """How a window becomes model input, and how coordinates and masks map back.

    ``mode`` is ``"longest"`` (SAM v1/HQ: the long side is resized to
    ``input_size``, the rest padded with zeros after normalisation) or
    ``"square"`` (SAM 2/3: stretched to ``input_size x input_size``).
    """

    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    mode: str = "longest"

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.mode == "square":
            return self.input_size, self.input_size
        s = self.input_size / max(h, w)
        return int(h * s + 0.5), int(w * s + 0.5)

    def pixels(self, window: np.ndarray, device: Any, dtype: Any):
        """``(1, 3, S, S)`` normalised tensor of a ``(h, w)`` window in [0, 1]."""
        import torch
        import torch.nn.functional as F

        h, w = window.shape
        nh, nw = self.resized_shape(h, w)
        x = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None, None]
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False,
                              antialias=nh < h or nw < w)
        x = x.expand(1, 3, nh, nw)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        x = (x - mean) / std
        if (nh, nw) != (self.input_size, self.input_size):
            x = F.pad(x, (0, self.input_size - nw, 0, self.input_size - nh))
        return x.to(device=device, dtype=dtype)

    def to_model(self, coords: np.ndarray, h: int, w: int) -> np.ndarray:
        """Continuous window coordinates ``(..., 2)`` (x, y) -> the model's point coordinates.

        The models add 0.5 to every coordinate ("centre of the pixel"), so a
        continuous coordinate ``u`` becomes ``u * scale - 0.5``.
        """
        nh, nw = self.resized_shape(h, w)
        out = np.asarray(coords, dtype=np.float64).copy()
        out[..., 0] = out[..., 0] * (nw / w) - 0.5
        out[..., 1] = out[..., 1] * (nh / h) - 0.5
        return out.astype(np.float32)

    def to_window(self, low_res, h: int, w: int):
        """Low-resolution mask logits ``(n, k, L, L')`` -> ``(n, k, h, w)`` logits on the window."""
        import torch.nn.functional as F

        low = low_res.float()
        if self.mode == "longest":
            nh, nw = self.resized_shape(h, w)
            lh = max(1, int(round(low.shape[-2] * nh / self.input_size)))
            lw = max(1, int(round(low.shape[-1] * nw / self.input_size)))
            low = low[..., :lh, :lw]
        n, k = low.shape[:2]
        if tuple(low.shape[-2:]) == (h, w):
            return low
        out = F.interpolate(low.reshape(n * k, 1, *low.shape[-2:]), size=(h, w), mode="bilinear",
                            align_corners=False)
        return out.reshape(n, k, h, w)


def _processor_stats(path: Path, default_mean, default_std) -> tuple[tuple, tuple]:
    """``image_mean``/``image_std`` from a folder's preprocessor/processor config, else the defaults."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        f = path / name
        if not f.is_file():
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        cfg = cfg.get("image_processor", cfg)
        mean, std = cfg.get("image_mean"), cfg.get("image_std")
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == 3 and len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return tuple(default_mean), tuple(default_std)


def _size(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise WeightsError(f"non-square model input {value} is not supported")
        return int(value[0])
    return int(value)


# --------------------------------------------------------------------------- backends
class Backend:
    """Common interface; see the module documentation."""

    family: str = ""
    prompt_kinds: frozenset[str] = frozenset()
    prep: Preprocess

    def __init__(self, model: Any, prep: Preprocess, device: Any, dtype: Any, family: str,
                 prompt_kinds: frozenset[str]) -> None:
        self.model = model.to(device=device, dtype=dtype).eval()
        self.prep = prep
        self.device = device
        self.dtype = dtype
        self.family = family
        self.prompt_kinds = prompt_kinds

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "class": type(self.model).__name__, "input_size": self.prep.input_size,
                "preprocess": self.prep.mode, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", "")}

    def embed(self, window: np.ndarray) -> Any:
        raise NotImplementedError

    def predict(self, embedding: Any, *, points: np.ndarray | None = None, boxes: np.ndarray | None = None,
                multimask: bool = True) -> Prediction:
        raise BackendError(f"{self.family} models do not take point or box prompts here")

    def predict_text(self, embedding: Any, prompts: list[str], *, threshold: float) -> Prediction:
        raise BackendError(f"{self.family} models do not take text prompts; text needs a SAM 3 model")

    def _prompt_tensors(self, h: int, w: int, points, boxes):
        import torch

        kw: dict[str, Any] = {}
        if points is not None:
            p = self.prep.to_model(np.asarray(points, np.float64).reshape(-1, 2), h, w)
            kw["input_points"] = torch.from_numpy(p).to(self.device, self.dtype)[None, :, None, :]
            kw["input_labels"] = torch.ones(kw["input_points"].shape[:3], dtype=torch.int64, device=self.device)
        if boxes is not None:
            b = np.asarray(boxes, np.float64).reshape(-1, 2, 2)
            b = self.prep.to_model(b, h, w).reshape(-1, 4)
            kw["input_boxes"] = torch.from_numpy(b).to(self.device, self.dtype)[None]
        return kw

    def _finish(self, low_res, scores, h: int, w: int) -> Prediction:
        logits = self.prep.to_window(low_res, h, w)
        return Prediction(masks=(logits > 0).cpu().numpy(), scores=scores.float().cpu().numpy())


@dataclass
class Embedding:
    """One window's image embedding (backend-specific tensors) and the window size."""

    data: Any
    height: int
    width: int


class HFPromptBackend(Backend):
    """transformers SamModel / SamHQModel / Sam2Model / Sam3TrackerModel with point and box prompts."""

    def embed(self, window: np.ndarray) -> Embedding:
        import torch

        h, w = window.shape
        with torch.inference_mode():
            data = self.model.get_image_embeddings(self.prep.pixels(window, self.device, self.dtype))
        return Embedding(data, h, w)

    def predict(self, embedding: Embedding, *, points=None, boxes=None, multimask=True) -> Prediction:
        import torch

        h, w = embedding.height, embedding.width
        kw = self._prompt_tensors(h, w, points, boxes)
        if self.family == "sam_hq":
            kw["image_embeddings"], kw["intermediate_embeddings"] = embedding.data
        else:
            kw["image_embeddings"] = embedding.data
        with torch.inference_mode():
            out = self.model(multimask_output=bool(multimask), **kw)
        return self._finish(out.pred_masks[0], out.iou_scores[0], h, w)


class MetaSamBackend(Backend):
    """Meta's ``segment_anything`` ``Sam`` module (where the package imports), same geometry as SAM v1."""

    def __init__(self, model: Any, device: Any, dtype: Any) -> None:
        size = int(model.image_encoder.img_size)
        super().__init__(model, Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, "longest"), device, dtype,
                         "sam-meta", frozenset({"points", "boxes"}))

    def embed(self, window: np.ndarray) -> Embedding:
        import torch

        h, w = window.shape
        with torch.inference_mode():
            data = self.model.image_encoder(self.prep.pixels(window, self.device, self.dtype))
        return Embedding(data, h, w)

    def predict(self, embedding: Embedding, *, points=None, boxes=None, multimask=True) -> Prediction:
        import torch

        h, w = embedding.height, embedding.width
        kw = self._prompt_tensors(h, w, points, boxes)
        pts = None
        if "input_points" in kw:
            pts = (kw["input_points"][0], kw["input_labels"][0])  # (n, 1, 2), (n, 1)
        bxs = kw["input_boxes"][0] if "input_boxes" in kw else None
        pe = self.model.prompt_encoder
        with torch.inference_mode():
            sparse, dense = pe(points=pts, boxes=bxs, masks=None)
            low, iou = self.model.mask_decoder(image_embeddings=embedding.data, image_pe=pe.get_dense_pe(),
                                               sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                               multimask_output=bool(multimask))
        return self._finish(low, iou, h, w)


class Sam3TextBackend(Backend):
    """transformers Sam3Model with text prompts: all instances of a concept in the window."""

    def __init__(self, model: Any, tokenizer: Any, prep: Preprocess, device: Any, dtype: Any) -> None:
        super().__init__(model, prep, device, dtype, "sam3", frozenset({"text"}))
        self.tokenizer = tokenizer
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 32))
        self._text: dict[str, tuple[Any, Any]] = {}

    def embed(self, window: np.ndarray) -> Embedding:
        import torch

        h, w = window.shape
        with torch.inference_mode():
            data = self.model.get_vision_features(self.prep.pixels(window, self.device, self.dtype))
        return Embedding(data, h, w)

    def text_features(self, prompt: str):
        """Text encoder output for *prompt*, computed once and reused for every window."""
        import torch

        if prompt not in self._text:
            tok = self.tokenizer(prompt, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt")
            ids = tok["input_ids"].to(self.device)
            mask = tok["attention_mask"].to(self.device)
            with torch.inference_mode():
                feats = self.model.get_text_features(input_ids=ids, attention_mask=mask, return_dict=True)
            self._text[prompt] = (feats, mask)
        return self._text[prompt]

    def predict_text(self, embedding: Embedding, prompts: list[str], *, threshold: float) -> Prediction:
        import torch
        import torch.nn.functional as F

        h, w = embedding.height, embedding.width
        masks, scores, which = [], [], []
        for i, prompt in enumerate(prompts):
            feats, mask = self.text_features(prompt)
            with torch.inference_mode():
                out = self.model(vision_embeds=embedding.data, text_embeds=feats, attention_mask=mask)
            s = out.pred_logits[0].float().sigmoid()
            if out.presence_logits is not None:
                s = s * out.presence_logits[0].float().sigmoid()
            keep = s > float(threshold)
            if not bool(keep.any()):
                continue
            prob = out.pred_masks[0][keep].float().sigmoid()[:, None]
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
            masks.append((prob > 0.5).cpu().numpy())
            scores.append(s[keep].cpu().numpy())
            which.append(np.full(int(keep.sum()), i, dtype=np.int64))
        if not masks:
            return Prediction(np.zeros((0, 1, h, w), bool), np.zeros((0, 1), np.float32), np.zeros(0, np.int64))
        return Prediction(np.concatenate(masks)[:, None], np.concatenate(scores)[:, None].astype(np.float32),
                          np.concatenate(which))


# --------------------------------------------------------------------------- loading
def _import_segment_anything():
    """Meta's ``segment_anything.sam_model_registry``, or one clear error saying why it does not import."""
    try:
        from segment_anything import sam_model_registry
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise BackendError(
            f"the segment_anything package does not import here ({missing} missing: it needs torchvision, "
            f"which this installation lacks); use meta_loader='converter' (the default), which runs the "
            f"same .pth checkpoint in transformers' SamModel"
        ) from None
    return sam_model_registry


def _meta_variant(state: dict[str, Any]) -> str:
    width = int(state["image_encoder.patch_embed.proj.weight"].shape[0])
    variants = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
    if width not in variants:
        raise WeightsError(f"Segment Anything checkpoint with a {width}-wide encoder is not one of ViT-B/L/H; "
                           f"use meta_loader='converter'")
    return variants[width]


def load_backend(resolved: ResolvedModel, *, prompt_mode: str, device: str = "cpu", dtype: str = "float32",
                 meta_loader: str = "converter") -> Backend:
    """Load the model of *resolved* for *prompt_mode* on *device*.

    Parameters
    ----------
    resolved : ResolvedModel
        From :meth:`aiflat_local.weights.WeightStore.resolve` (existence and
        checksums already checked).
    prompt_mode : str
        ``points``, ``boxes``, ``grid`` (points on a grid) or ``text``.
    device, dtype : str
        ``cpu``/``cuda``/``cuda:N``; ``float32`` or ``float16`` (CUDA only).
    meta_loader : str
        For a Meta ``.pth``: ``converter`` (transformers SamModel, always
        available) or ``segment_anything`` (Meta's package, needs torchvision).

    Raises
    ------
    WeightsError
        The files are not a SAM-family model, or do not fit it.
    BackendError
        The model cannot serve *prompt_mode*, the device or dtype is not
        available, or segment_anything does not import.
    """
    import torch  # noqa: F401  (fail here, not halfway)

    dev = torch_device(device)
    dt = torch_dtype(dtype, device)
    kind = "text" if prompt_mode == "text" else "points"
    path = Path(resolved.path)
    if path.is_file():
        if kind == "text":
            raise BackendError(f"{resolved.name}: a SAM v1 checkpoint takes no text prompts; text needs a SAM 3 model")
        # resolve() has verified a known checksum already; the pickle is read with weights_only=True
        state = load_state_dict(path)
        from ._sam_convert import check_meta_sam

        check_meta_sam(state)
        if meta_loader == "segment_anything":
            registry = _import_segment_anything()
            model = registry[_meta_variant(state)]()  # no checkpoint argument: Meta's loader unpickles unsafely
            keys = set(model.state_dict())
            try:
                model.load_state_dict({k: v for k, v in state.items() if k in keys}, strict=True)
            except RuntimeError as exc:
                raise WeightsError(f"{path}: does not fit segment_anything's model ({str(exc).splitlines()[0]})") from None
            return MetaSamBackend(model, dev, dt)
        if meta_loader != "converter":
            raise BackendError(f"meta_loader must be 'converter' or 'segment_anything', not {meta_loader!r}")
        from ._sam_convert import sam_model_from_meta

        model = sam_model_from_meta(state)
        size = int(model.config.prompt_encoder_config.image_size)
        return HFPromptBackend(model, Preprocess(size, IMAGENET_MEAN, IMAGENET_STD, "longest"), dev, dt, "sam",
                               frozenset({"points", "boxes"}))

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"missing file {cfg_path}: {path} is not a transformers model folder")
    try:
        model_type = json.loads(cfg_path.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{cfg_path}: unreadable ({exc})") from None
    import transformers

    if model_type in ("sam3", "sam3_video") and kind == "text":
        from transformers import AutoTokenizer

        with quiet_transformers():
            model = load_pretrained(transformers.Sam3Model, path)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError, TypeError) as exc:
                raise WeightsError(f"{path}: SAM 3 text prompts need the tokenizer files of the model folder "
                                   f"(tokenizer.json / vocab.json ...): {str(exc).splitlines()[0]}") from None
        size = _size(model.config.vision_config.image_size)
        mean, std = _processor_stats(path, HALF_MEAN, HALF_MEAN)
        return Sam3TextBackend(model, tokenizer, Preprocess(size, mean, std, "square"), dev, dt)
    if model_type == "sam3_video":
        model_type = "sam3_tracker"  # the full SAM 3 folder also holds the tracker (point/box prompts)
    if model_type == "sam3":
        raise BackendError(f"{resolved.name}: this SAM 3 folder holds the detector only, which takes text "
                           f"prompts; use prompt_mode='text', or bring the full facebook/sam3 folder")
    if model_type not in _FOLDER_TYPES:
        raise WeightsError(f"{path}: model type {model_type!r} is not a SAM-family model "
                           f"(expected one of sam, sam_hq, sam2, sam3_video, sam3, sam3_tracker)")
    family, cls_name, kinds = _FOLDER_TYPES[model_type]
    if kind == "text":
        raise BackendError(f"{resolved.name}: {family} models take no text prompts; text needs a SAM 3 model "
                           f"(use prompt_mode points, boxes or grid)")
    with quiet_transformers():
        model = load_pretrained(getattr(transformers, cls_name), path)
    size = _size(model.config.prompt_encoder_config.image_size)
    if family in ("sam", "sam_hq"):
        mean, std = _processor_stats(path, IMAGENET_MEAN, IMAGENET_STD)
        prep = Preprocess(size, mean, std, "longest")
    else:
        default = HALF_MEAN if family == "sam3_tracker" else IMAGENET_MEAN
        mean, std = _processor_stats(path, default, default)
        prep = Preprocess(size, mean, std, "square")
    return HFPromptBackend(model, prep, dev, dt, family, kinds)

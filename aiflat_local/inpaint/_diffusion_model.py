"""torch/diffusers side of the diffusion inpainter: offline loading, devices, memory, batched calls.

Imported only when a diffusion inpainter actually runs. Every failure a user
can cause or fix (missing or wrong weights, no GPU, not enough GPU memory)
is raised as one :class:`~aiflat_local.errors.AiflatError` line that names
the option that would help.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import BackendError, WeightsError

#: Pipeline classes (``_class_name`` in ``model_index.json``) known to work.
KNOWN_PIPELINES = ("StableDiffusionInpaintPipeline", "StableDiffusionXLInpaintPipeline")
_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
           "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_GIB = 1024.0 ** 3

# Names of the command-line options quoted in error messages.
OPT_BATCH = "--inpaint-batch-size"
OPT_DTYPE = "--dtype"
OPT_DEVICE = "--device"


def force_offline() -> None:
    """Make huggingface_hub, transformers and diffusers refuse any network access.

    Must run before those libraries are imported (they read the variables at
    import time); every load also passes ``local_files_only=True``.
    """
    try:
        from .. import weights

        hook = getattr(weights, "force_offline", None)
    except ImportError:  # pragma: no cover - weights.py is part of the package
        hook = None
    if hook is not None:
        hook()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


# --------------------------------------------------------------------------- options
def normalise_dtype(dtype: str | None, device: str) -> str:
    """Validate a dtype name for *device*; None -> float16 on CUDA, float32 on CPU."""
    is_cuda = device.startswith("cuda")
    if dtype is None:
        return "float16" if is_cuda else "float32"
    name = _DTYPES.get(str(dtype).lower().replace("torch.", ""))
    if name is None:
        raise BackendError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16")
    if name == "float16" and not is_cuda:
        raise BackendError(f"{OPT_DTYPE} float16 needs a CUDA device ({OPT_DEVICE} cuda); on CPU use float32")
    return name


def check_device_name(device: str) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (lower-cased); anything else is one clear error."""
    device = str(device).lower()
    if not (device in ("cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise BackendError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return device


def check_device(device: str) -> str:
    """:func:`check_device_name`, and a CUDA device must exist."""
    device = check_device_name(device)
    if device == "cpu":
        return device
    import torch

    if not torch.cuda.is_available():
        raise BackendError(f"{OPT_DEVICE} {device} requested but torch sees no CUDA device "
                           f"(torch {torch.__version__}); use {OPT_DEVICE} cpu")
    index = int(device[5:]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise BackendError(f"{OPT_DEVICE} {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


# --------------------------------------------------------------------------- model folders
def resolve_model(model: str, weights_dir: str | os.PathLike | None = None) -> tuple[Path, dict[str, Any]]:
    """A model folder from a weights-store name or a directory path -> ``(path, store entry or {})``.

    A name goes through :meth:`aiflat_local.weights.WeightStore.require`
    (missing files raise one line with the fetch command; pinned checksums
    are verified). An existing directory is used as it is.
    """
    from ..weights import WeightStore

    path = Path(model).expanduser()
    if path.is_dir():
        return path, {}
    store = WeightStore(weights_dir)
    if model not in store.models and (os.sep in model or "/" in model or path.suffix):
        raise WeightsError(f"{model}: no such model folder, and not a model name known to the store "
                           f"({store.directory}; see `aiflat-local weights list`)")
    base = store.require(model)
    entry = store.entry(model)
    if not base.is_dir():
        raise WeightsError(f"model {model!r}: {base} is not a diffusers model folder")
    return base, entry


def read_model_index(root: Path) -> dict[str, Any]:
    """``model_index.json`` of a diffusers folder (one clear error when absent or broken)."""
    index = root / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{root}: not a diffusers model folder (no model_index.json); bring a "
                           f"Stable Diffusion inpainting folder, e.g. `hf download "
                           f"stable-diffusion-v1-5/stable-diffusion-inpainting --local-dir DIR`")
    try:
        return json.loads(index.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{index}: unreadable ({exc})") from None


def pipeline_class_name(root: Path) -> str:
    """The inpainting pipeline class a folder declares (refuses non-inpainting models)."""
    name = str(read_model_index(root).get("_class_name", ""))
    if name in KNOWN_PIPELINES or name.endswith("InpaintPipeline"):
        return name
    raise WeightsError(f"{root}: a {name or 'unknown'} model, not an inpainting model; use an inpainting "
                       f"checkpoint ({', '.join(KNOWN_PIPELINES)})")


def _components(root: Path) -> list[str]:
    index = read_model_index(root)
    return [k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and v[0] is not None]


def choose_variant(root: Path, dtype: str) -> str | None:
    """``"fp16"`` when the folder's UNet has fp16 files and they fit the run, else None.

    fp16 files are used for a float16 run, and for any run when the folder has
    no full-precision UNet (they are upcast on load).
    """
    unet = root / "unet"
    full = any((unet / f"diffusion_pytorch_model{s}").is_file() for s in _WEIGHT_SUFFIXES) or any(
        unet.glob("diffusion_pytorch_model-*-of-*.safetensors"))
    half = any((unet / f"diffusion_pytorch_model.fp16{s}").is_file() for s in _WEIGHT_SUFFIXES) or any(
        unet.glob("diffusion_pytorch_model.fp16-*-of-*.safetensors"))
    if half and (dtype == "float16" or not full):
        return "fp16"
    return None


def weight_files(root: Path, variant: str | None) -> list[Path]:
    """The weight files a load with *variant* reads (one format per component, safetensors first)."""
    files: list[Path] = []
    for comp in _components(root):
        folder = root / comp
        if not folder.is_dir():
            continue
        cands = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
        if variant:
            chosen = [p for p in cands if f".{variant}." in p.name or f".{variant}-" in p.name]
        else:
            chosen = [p for p in cands if ".fp16." not in p.name and ".fp16-" not in p.name]
        chosen = chosen or cands
        safe = [p for p in chosen if p.name.endswith(".safetensors")]
        files.extend(safe or chosen)
    return files


def weights_sha256(root: Path, files: Sequence[Path], entry: dict[str, Any], compute: bool) -> dict[str, str]:
    """sha256 of each weight file: pinned in the store entry where known, else computed if *compute*."""
    from ..weights import sha256_file

    known = {k: v for k, v in (entry.get("files") or {}).items() if v}
    out: dict[str, str] = {}
    for p in files:
        rel = str(p.relative_to(root))
        if rel in known:
            out[rel] = known[rel]
        elif compute:
            out[rel] = sha256_file(p)
    return out


# --------------------------------------------------------------------------- memory
def _free_gib(device: str) -> tuple[float, float]:
    import torch

    free, total = torch.cuda.mem_get_info(torch.device(device))
    return free / _GIB, total / _GIB


def memory_advice(device: str, dtype: str, batch_size: int | None) -> str:
    """The options that lower memory use, in the order worth trying."""
    tips = []
    if batch_size and batch_size > 1:
        tips.append(f"{OPT_BATCH} {max(1, batch_size // 2)}")
    if device.startswith("cuda") and dtype == "float32":
        tips.append(f"{OPT_DTYPE} float16")
    if device.startswith("cuda"):
        tips.append(f"{OPT_DEVICE} cpu")
    return " or ".join(tips) if tips else "a machine with more memory"


def out_of_memory(device: str, dtype: str, what: str, batch_size: int | None = None) -> BackendError:
    """The one-line error for a run that does not fit in memory."""
    where = device
    if device.startswith("cuda"):
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
            free, total = _free_gib(device)
            where = f"{device} ({free:.1f} of {total:.1f} GiB free)"
    return BackendError(f"the diffusion model does not fit in the memory of {where} {what} in {dtype}; "
                        f"try {memory_advice(device, dtype, batch_size)}")


def check_gpu_fits(files: Sequence[Path], variant: str | None, dtype: str, device: str) -> None:
    """Refuse before loading when the weights alone cannot fit in the free GPU memory."""
    if not device.startswith("cuda") or not files:
        return
    stored = 2 if variant == "fp16" else 4
    need = sum(p.stat().st_size for p in files) * (4 if dtype == "float32" else 2) / stored / _GIB
    free, total = _free_gib(device)
    if need * 1.1 > free:
        raise BackendError(f"the diffusion model needs about {need:.1f} GiB for its weights in {dtype} but "
                           f"{device} has {free:.1f} of {total:.1f} GiB free; try "
                           f"{memory_advice(device, dtype, None)}")


@contextlib.contextmanager
def quiet(load: bool = False):
    """Silence diffusers' and transformers' log chatter and progress bars (restored afterwards).

    Their notices (missing ``accelerate``, torchvision fallbacks, "loading
    weights" bars, per-call truncation notes) are not the user's business in a
    batch tool; real problems still raise. Only libraries already imported are
    touched unless *load* is true (so a stand-in pipeline costs no import).
    """
    import importlib
    import sys

    libs = []
    for name in ("diffusers", "transformers"):
        if load or name in sys.modules:
            libs.append(importlib.import_module(f"{name}.utils.logging"))
    saved = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libs]
    for lib in libs:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (verbosity, bar) in zip(libs, saved):
            lib.set_verbosity(verbosity)
            if bar:
                lib.enable_progress_bar()


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


# --------------------------------------------------------------------------- the model
@dataclass
class LoadedModel:
    """A diffusers inpainting pipeline ready to run, and what it is (provenance).

    Attributes
    ----------
    pipe : Any
        The pipeline (or any object called like one: see :meth:`run`).
    info : dict
        JSON-friendly description: path, class, variant, dtype, device, weights sha256.
    native_size : int
        The model's training resolution in pixels (SD 1.5: 512, SDXL: 1024).
    cell : int
        Pixels per latent cell (the VAE's scale factor, 8 for Stable Diffusion).
    """

    pipe: Any
    device: str
    dtype: str
    info: dict[str, Any] = field(default_factory=dict)
    native_size: int = 512
    cell: int = 8

    @classmethod
    def wrap(cls, pipe: Any, device: str, dtype: str, label: str = "in-memory pipeline") -> "LoadedModel":
        """Use an already built pipeline (or a stand-in with the same call signature)."""
        cell = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        native = 512
        unet = getattr(pipe, "unet", None)
        sample = getattr(getattr(unet, "config", None), "sample_size", None)
        if isinstance(sample, int):
            native = sample * cell
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        info = {"model": label, "pipeline_class": type(pipe).__name__, "device": device, "dtype": dtype}
        scheduler = getattr(pipe, "scheduler", None)
        if scheduler is not None:
            info["scheduler"] = type(scheduler).__name__
        return cls(pipe, device, dtype, info, native, cell)

    def run(self, gray: np.ndarray, mask: np.ndarray, seeds: Sequence[int], *, prompt: str,
            negative_prompt: str, steps: int, guidance_scale: float) -> np.ndarray:
        """Inpaint a batch.

        Parameters
        ----------
        gray : (B, H, W) float array
            Model-unit gray in [-1, 1] (masked pixels 0).
        mask : (B, H, W) bool array
            True = paint.
        seeds : sequence of int
            One seed per batch element; each element's noise comes from its own
            CPU generator, so a sample does not depend on the batch it ran in
            (nor, for the initial noise, on the device).

        Returns
        -------
        (B, H, W) float64 model-unit gray (the model's RGB averaged).
        """
        import torch

        from ._diffusion_crops import gray_to_model_rgb, model_rgb_to_gray

        b, h, w = gray.shape
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        try:
            with torch.inference_mode(), quiet():
                out = self.pipe(
                    prompt=[prompt] * b, negative_prompt=[negative_prompt] * b,
                    image=gray_to_model_rgb(gray), mask_image=mask.astype(np.float32)[..., None],
                    height=h, width=w, strength=1.0, num_inference_steps=int(steps),
                    guidance_scale=float(guidance_scale), generator=generators, output_type="np",
                )
        except Exception as exc:
            if _is_oom(exc):
                raise out_of_memory(self.device, self.dtype, f"for a batch of {b} crops of {w} x {h} px",
                                    b) from None
            raise
        images = out.images if hasattr(out, "images") else out[0]
        images = np.asarray(images.detach().float().cpu() if hasattr(images, "detach") else images)
        if images.shape != (b, h, w, 3):
            raise BackendError(f"the diffusion pipeline returned images of shape {images.shape}, "
                               f"expected {(b, h, w, 3)}")
        return model_rgb_to_gray(images)


def load(root: Path, entry: dict[str, Any], *, device: str, dtype: str, hash_weights: bool = True,
         label: str | None = None) -> LoadedModel:
    """Load a diffusers inpainting folder offline onto *device* in *dtype*."""
    force_offline()
    class_name = pipeline_class_name(root)
    variant = choose_variant(root, dtype)
    files = weight_files(root, variant)
    if not files:
        raise WeightsError(f"{root}: no weight files (*.safetensors / *.bin) in its component folders; "
                           f"the download is incomplete")
    check_gpu_fits(files, variant, dtype, device)
    import torch

    import diffusers

    with quiet(load=True):
        cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise WeightsError(f"{root}: pipeline {class_name} is not in diffusers {diffusers.__version__}")
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": getattr(torch, dtype)}
    if variant:
        kwargs["variant"] = variant
    comps = read_model_index(root)
    if "safety_checker" in comps:
        # The NSFW checker blacks out images it dislikes; a solar crop is never one.
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with quiet(load=True):
            pipe = cls.from_pretrained(str(root), **kwargs)
            pipe = pipe.to(device)
    except (OSError, ValueError, RuntimeError, KeyError, ImportError, MemoryError) as exc:
        if _is_oom(exc):
            raise out_of_memory(device, dtype, "for the model weights") from None
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        raise WeightsError(f"{root}: could not load the diffusion model ({type(exc).__name__}: {first}); "
                           f"the folder is incomplete or corrupted, fetch it again") from None
    if hasattr(pipe, "vae") and hasattr(pipe.vae, "enable_slicing"):
        pipe.vae.enable_slicing()  # decode a batch one crop at a time: same result, less memory
    model = LoadedModel.wrap(pipe, device, dtype, label or str(root))
    model.info.update(
        path=str(root), pipeline_class=class_name, variant=variant,
        weights_sha256=weights_sha256(root, files, entry, hash_weights),
        diffusers=diffusers.__version__, torch=torch.__version__,
    )
    return model

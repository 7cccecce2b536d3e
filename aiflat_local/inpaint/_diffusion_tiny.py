"""A tiny, randomly initialised diffusers inpainting folder, built offline.

Exercises the diffusion inpainter's real loading and calling code without any
download: the tests use it, the benchmark's ``--smoke`` mode uses it, and a
user can run it to check an install. Its output is noise-like garbage by
design; only shapes, dtypes, plumbing and determinism mean anything.

The tokenizer is a CLIP byte-pair tokenizer built from a vocabulary and merge
list written here (lower-case letters, a few punctuation marks, two merges).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_PUNCT = ",.!-'"


def write_tiny_tokenizer(directory: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of a tiny CLIP tokenizer; return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _LETTERS + _PUNCT:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["#version: 0.2", "s o", "so l</w>"]
    for token in ("so", "sol</w>"):
        vocab[token] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return directory


def _tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(directory)), model_max_length=16,
                                         local_files_only=True)


def _text_config(vocab_size: int, hidden: int, projection: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden,
                          intermediate_size=2 * hidden, num_attention_heads=2, num_hidden_layers=2,
                          vocab_size=vocab_size, max_position_embeddings=16, projection_dim=projection)


def _vae():
    from diffusers import AutoencoderKL

    # Four blocks: a VAE scale factor of 8, as in Stable Diffusion.
    return AutoencoderKL(block_out_channels=(4, 4, 8, 8), in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         latent_channels=4, norm_num_groups=2, layers_per_block=1, sample_size=64)


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def make_tiny_inpaint_pipeline(directory: str | os.PathLike, kind: str = "sd", seed: int = 0) -> Path:
    """Build a tiny random inpainting pipeline and ``save_pretrained`` it into *directory*.

    Parameters
    ----------
    directory : path
        Output folder (created); afterwards a diffusers folder with ``model_index.json``.
    kind : {"sd", "sdxl"}
        ``StableDiffusionInpaintPipeline`` (one text encoder) or
        ``StableDiffusionXLInpaintPipeline`` (two, with time conditioning).
    seed : int
        torch seed for the random weights.

    The UNet has 9 input channels (4 latent + 1 mask + 4 masked-image latent)
    and a native size of 64 px (8 x 8 latents); everything is a few kB.
    """
    import torch

    from ._diffusion_model import force_offline, quiet

    force_offline()
    with quiet(load=True):
        from diffusers import UNet2DConditionModel
    directory = Path(directory)
    torch.manual_seed(seed)
    unet_common = dict(block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=9, out_channels=4,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=4, norm_num_groups=8)
    tok = _tokenizer(directory / "_tokenizer_src")
    vocab_size = len(tok)
    if kind == "sd":
        with quiet(load=True):
            from diffusers import StableDiffusionInpaintPipeline
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel(cross_attention_dim=16, **unet_common)
        pipe = StableDiffusionInpaintPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_text_config(vocab_size, 16, 16)), tokenizer=tok, unet=unet,
            scheduler=_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        with quiet(load=True):
            from diffusers import StableDiffusionXLInpaintPipeline
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        unet = UNet2DConditionModel(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                                    projection_class_embeddings_input_dim=6 * 8 + 16, use_linear_projection=True,
                                    **unet_common)
        pipe = StableDiffusionXLInpaintPipeline(
            vae=_vae(), text_encoder=CLIPTextModel(_text_config(vocab_size, 16, 16)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size, 16, 16)), tokenizer=tok,
            tokenizer_2=tok, unet=unet, scheduler=_scheduler(), requires_aesthetics_score=False)
    else:
        raise ValueError(f"kind must be 'sd' or 'sdxl', not {kind!r}")
    from ._diffusion_model import quiet

    with quiet(load=True):
        pipe.save_pretrained(str(directory))
    return directory

"""Meta's original SAM checkpoints (``sam_vit_*.pth``) -> transformers' ``SamModel``.

The two implementations hold the same tensors under different names. The
renames below were derived by listing both state dicts of the same
architecture (segment_anything's ``modeling`` classes and transformers'
``SamModel``) side by side; ``tests/test_sam.py`` checks them by converting
a tiny Meta model and comparing its masks with the converted model's.

The architecture (ViT-B/L/H or anything else) is read from the tensor shapes,
so no size has to be given. Torch is imported inside the functions.
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import WeightsError

#: Substring renames, applied in order to every key.
RENAMES: tuple[tuple[str, str], ...] = (
    ("image_encoder.", "vision_encoder."),
    (".blocks.", ".layers."),
    ("patch_embed.proj.", "patch_embed.projection."),
    (".neck.0.", ".neck.conv1."),
    (".neck.1.", ".neck.layer_norm1."),
    (".neck.2.", ".neck.conv2."),
    (".neck.3.", ".neck.layer_norm2."),
    (".norm1.", ".layer_norm1."),
    (".norm2.", ".layer_norm2."),
    (".norm3.", ".layer_norm3."),
    (".norm4.", ".layer_norm4."),
    ("transformer.norm_final_attn.", "transformer.layer_norm_final_attn."),
    ("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
     "prompt_encoder.shared_embedding.positional_embedding"),
    ("prompt_encoder.point_embeddings.", "prompt_encoder.point_embed."),
    ("prompt_encoder.mask_downscaling.0.", "prompt_encoder.mask_embed.conv1."),
    ("prompt_encoder.mask_downscaling.1.", "prompt_encoder.mask_embed.layer_norm1."),
    ("prompt_encoder.mask_downscaling.3.", "prompt_encoder.mask_embed.conv2."),
    ("prompt_encoder.mask_downscaling.4.", "prompt_encoder.mask_embed.layer_norm2."),
    ("prompt_encoder.mask_downscaling.6.", "prompt_encoder.mask_embed.conv3."),
    ("mask_decoder.output_upscaling.0.", "mask_decoder.upscale_conv1."),
    ("mask_decoder.output_upscaling.1.", "mask_decoder.upscale_layer_norm."),
    ("mask_decoder.output_upscaling.3.", "mask_decoder.upscale_conv2."),
)
#: Meta's 3-layer MLP heads ``layers.{0,1,2}`` are ``proj_in``, ``layers.0``, ``proj_out`` in transformers.
_MLP_HEAD = re.compile(r"^(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head))\.layers\.(\d+)\.(.+)$")
#: Buffers of Meta's ``Sam`` that transformers does not keep (normalisation is done by aiflat-local).
DROPPED = ("pixel_mean", "pixel_std")


def is_meta_sam(state: dict[str, Any]) -> bool:
    """True if *state* looks like a SAM v1 checkpoint in Meta's naming."""
    return any(k.startswith("image_encoder.patch_embed.proj.") for k in state) and \
        any(k.startswith("mask_decoder.") for k in state)


def rename_key(key: str, n_mlp_layers: dict[str, int]) -> str:
    """Transformers name of one Meta key (*n_mlp_layers*: depth of each MLP head, by prefix)."""
    m = _MLP_HEAD.match(key)
    if m:
        prefix, idx, rest = m.group(1), int(m.group(2)), m.group(3)
        last = n_mlp_layers[prefix] - 1
        if idx == 0:
            key = f"{prefix}.proj_in.{rest}"
        elif idx == last:
            key = f"{prefix}.proj_out.{rest}"
        else:
            key = f"{prefix}.layers.{idx - 1}.{rest}"
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def check_meta_sam(state: dict[str, Any]) -> None:
    """One clear :class:`WeightsError` when *state* is not a SAM v1 checkpoint in Meta's format."""
    if any(k.startswith("image_encoder.trunk.") for k in state):
        raise WeightsError("this is a SAM 2 checkpoint in Meta's format, which is not converted here; bring "
                           "the transformers folder instead (e.g. `hf download facebook/sam2.1-hiera-large "
                           "config.json model.safetensors --local-dir sam2.1-hiera-large`)")
    if any(k.startswith("mask_decoder.hf_token") for k in state):
        raise WeightsError("this is a SAM-HQ checkpoint in Meta's format, which is not converted here; bring "
                           "the transformers folder instead (e.g. syscv-community/sam-hq-vit-base)")
    if not is_meta_sam(state):
        raise WeightsError("this checkpoint is not a Segment Anything (v1) checkpoint in Meta's format "
                           "(no image_encoder.patch_embed / mask_decoder tensors)")


def convert_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """Rename a Meta SAM state dict to transformers' ``SamModel`` names.

    The prompt encoder's random-Fourier matrix is stored once by Meta and
    twice by transformers (``shared_image_embedding`` too); it is duplicated.
    """
    check_meta_sam(state)
    depth: dict[str, int] = {}
    for key in state:
        m = _MLP_HEAD.match(key)
        if m:
            depth[m.group(1)] = max(depth.get(m.group(1), 0), int(m.group(2)) + 1)
    out = {rename_key(k, depth): v for k, v in state.items() if k not in DROPPED}
    pe = out.get("prompt_encoder.shared_embedding.positional_embedding")
    if pe is not None:
        out["shared_image_embedding.positional_embedding"] = pe
    return out


def config_from_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """``SamConfig`` keyword arguments that fit a Meta SAM state dict (read from tensor shapes).

    ViT width from the patch embedding, depth from the block count, head
    dimension from the relative position tables (so heads = width / head dim),
    global-attention blocks as those whose tables span the whole embedding
    grid, image and patch size from the absolute position embedding.
    """
    try:
        patch = state["image_encoder.patch_embed.proj.weight"]  # (C, 3, p, p)
        pos = state["image_encoder.pos_embed"]  # (1, g, g, C)
        width, patch_size = int(patch.shape[0]), int(patch.shape[-1])
        grid = int(pos.shape[1])
        blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.")})
        depth = len(blocks)
        head_dim = int(state["image_encoder.blocks.0.attn.rel_pos_h"].shape[1])
        global_idx = [b for b in blocks if int(state[f"image_encoder.blocks.{b}.attn.rel_pos_h"].shape[0]) == 2 * grid - 1]
        windows = [int(state[f"image_encoder.blocks.{b}.attn.rel_pos_h"].shape[0]) for b in blocks if b not in global_idx]
        window = (windows[0] + 1) // 2 if windows else 14
        mlp_dim = int(state["image_encoder.blocks.0.mlp.lin1.weight"].shape[0])
        out_ch = int(state["image_encoder.neck.0.weight"].shape[0])
        pe = state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]  # (2, F)
        prompt_dim = int(state["prompt_encoder.no_mask_embed.weight"].shape[1])
        mask_in = int(state["prompt_encoder.mask_downscaling.6.weight"].shape[1])
        dec_layers = len({int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers.")})
        dec_mlp = int(state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0])
        down = prompt_dim // int(state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0])
        n_masks = int(state["mask_decoder.mask_tokens.weight"].shape[0]) - 1
        iou_layers = len({int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.iou_prediction_head.layers.")})
        iou_hidden = int(state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0])
    except (KeyError, IndexError) as exc:
        raise WeightsError(f"incomplete Segment Anything checkpoint: tensor {exc} missing") from None
    image_size = grid * patch_size
    # heads of the mask decoder are not visible in the shapes: SAM uses 8 (256-d tokens)
    dec_heads = 8 if prompt_dim % 8 == 0 else 1
    return {
        "vision_config": dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // head_dim,
                              image_size=image_size, patch_size=patch_size, window_size=window,
                              global_attn_indexes=global_idx, mlp_dim=mlp_dim, output_channels=out_ch,
                              num_pos_feats=int(pe.shape[1])),
        "prompt_encoder_config": dict(hidden_size=prompt_dim, image_size=image_size, patch_size=patch_size,
                                      mask_input_channels=mask_in),
        "mask_decoder_config": dict(hidden_size=prompt_dim, mlp_dim=dec_mlp, num_hidden_layers=dec_layers,
                                    num_attention_heads=dec_heads, attention_downsample_rate=down,
                                    num_multimask_outputs=n_masks, iou_head_depth=iou_layers,
                                    iou_head_hidden_dim=iou_hidden),
    }


def sam_model_from_meta(state: dict[str, Any], *, decoder_heads: int | None = None):
    """Build a transformers ``SamModel`` holding the tensors of a Meta SAM state dict.

    Every tensor must find its place and every model tensor must be filled
    (``strict=True``); anything else is a :class:`WeightsError`.
    """
    from transformers import SamConfig, SamModel

    check_meta_sam(state)
    kwargs = config_from_state_dict(state)
    if decoder_heads is not None:
        kwargs["mask_decoder_config"]["num_attention_heads"] = int(decoder_heads)
    model = SamModel(SamConfig(**kwargs))
    converted = convert_state_dict(state)
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"the Segment Anything checkpoint does not fit SamModel ({str(exc).splitlines()[0]})") from None
    return model.eval()

"""A tiny, randomly initialised SAM (or SAM-HQ) folder in transformers' layout, built offline.

Exercises the SAM masker's real loading and calling code without any
download: the tests and the benchmark's ``--smoke`` mode use it. Its masks are
meaningless by design; only shapes, plumbing and determinism mean anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_tiny_sam(path: str | os.PathLike, *, hq: bool = False, image_size: int = 64,
                   num_hidden_layers: int = 2, seed: int = 0):
    """Save a tiny random ``SamModel`` (``SamHQModel`` with *hq*) with its preprocessor config into *path*.

    The vision encoder has patches of 8 px, attention windows of half the patch
    grid and global attention in its last layer. Returns the model (eval mode).
    """
    import torch
    from transformers import SamConfig, SamHQConfig, SamHQModel, SamModel

    from ._sam_models import quiet_transformers

    path = Path(path)
    torch.manual_seed(seed)
    kw = dict(
        vision_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=2, image_size=image_size, patch_size=8,
                           window_size=max(1, image_size // 16), global_attn_indexes=[num_hidden_layers - 1],
                           num_pos_feats=4, mlp_dim=16),
        prompt_encoder_config=dict(hidden_size=8, image_size=image_size, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=8, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=8, **({"vit_dim": 16} if hq else {})),
    )
    model = (SamHQModel(SamHQConfig(**kw)) if hq else SamModel(SamConfig(**kw))).eval()
    with quiet_transformers():
        model.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return model

"""The SAM masker: tiny random SAM / SAM-HQ / SAM 2 / SAM 3 models through the real loading code,
Meta's checkpoint format, and prompting, tiling, filtering and merging checked with deterministic fakes.

No weights are downloaded: every model here is built from its transformers config class with a
few thousand random parameters, saved with ``save_pretrained`` (the layout a user brings) into a
temporary folder, and loaded back through the weights store.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from aiflat_local.errors import BackendError, WeightsError

EIGHT = np.ones((3, 3), bool)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (the test machine's cores are shared)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- tiny models
def build_sam(path: Path, hq: bool = False):
    from aiflat_local.masks._sam_tiny import write_tiny_sam

    return write_tiny_sam(path, hq=hq)


def build_sam2(path: Path):
    import torch
    from transformers import Sam2Config, Sam2Model

    torch.manual_seed(0)
    s = 128
    backbone = dict(model_type="sam2_hiera_det_model", hidden_size=8, num_attention_heads=1, image_size=[s, s],
                    blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[8, 16, 32, 64],
                    num_attention_heads_per_stage=[1, 1, 2, 2], window_size_per_stage=[4, 4, 4, 4],
                    global_attention_blocks=[3], window_positional_embedding_background_size=[2, 2])
    cfg = Sam2Config(
        vision_config=dict(backbone_config=backbone, backbone_channel_list=[64, 32, 16, 8],
                           backbone_feature_sizes=[[s // 4] * 2, [s // 8] * 2, [s // 16] * 2], fpn_hidden_size=16),
        prompt_encoder_config=dict(hidden_size=16, image_size=s, patch_size=16, mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=16, num_hidden_layers=1, num_attention_heads=2,
                                 iou_head_hidden_dim=8),
    )
    model = Sam2Model(cfg).eval()
    model.save_pretrained(path)
    return model


def tiny_clip_tokenizer(path: Path):
    """A character-level CLIP BPE tokenizer (no merges), saved like the real one."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(path)
    return tok


def build_sam3(path: Path):
    """The full SAM 3 layout (model_type sam3_video: detector + tracker + tokenizer) with tiny sizes.

    transformers 5.24's ``Sam3VideoModel.save_pretrained`` writes the tracker's tensors under a doubled
    ``tracker_model.tracker_model.`` prefix; the hub checkpoint (and the renames transformers applies when
    loading ``Sam3TrackerModel`` from it) use a single ``tracker_model.``, so the file is rewritten that way.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Sam3VideoConfig, Sam3VideoModel

    torch.manual_seed(0)
    s, p = 56, 14
    g = s // p
    vit = dict(model_type="sam3_vit_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
               num_attention_heads=2, image_size=s, patch_size=p, window_size=2, global_attn_indexes=[1],
               pretrain_image_size=28)
    vision = dict(backbone_config=vit, fpn_hidden_size=16, backbone_feature_sizes=[[4 * g] * 2, [2 * g] * 2, [g] * 2])
    text = dict(model_type="clip_text_model", vocab_size=54, hidden_size=16, intermediate_size=32, projection_dim=16,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16, bos_token_id=0,
                eos_token_id=1, pad_token_id=1)
    small = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)
    detector = dict(model_type="sam3", vision_config=vision, text_config=text,
                    geometry_encoder_config=dict(small, num_layers=1), detr_encoder_config=dict(small, num_layers=1),
                    detr_decoder_config=dict(small, num_layers=1, num_queries=4),
                    mask_decoder_config=dict(hidden_size=16, num_attention_heads=2, num_upsampling_stages=2))
    tracker = dict(model_type="sam3_tracker_video", vision_config=vision,
                   prompt_encoder_config=dict(hidden_size=16, image_size=s, patch_size=p, mask_input_channels=4),
                   mask_decoder_config=dict(hidden_size=16, mlp_dim=16, num_attention_heads=2, iou_head_hidden_dim=8),
                   memory_attention_hidden_size=16, memory_attention_num_layers=1,
                   memory_attention_feed_forward_hidden_size=16, memory_encoder_hidden_size=16,
                   memory_encoder_output_channels=8, mask_downsampler_embed_dim=16, memory_fuser_embed_dim=16,
                   memory_fuser_intermediate_dim=16, memory_fuser_num_layers=1,
                   memory_attention_rope_feat_sizes=[g, g])
    model = Sam3VideoModel(Sam3VideoConfig(detector_config=detector, tracker_config=tracker)).eval()
    model.save_pretrained(path)
    weights = path / "model.safetensors"
    state = load_file(str(weights))
    save_file({k.replace("tracker_model.tracker_model.", "tracker_model."): v for k, v in state.items()},
              str(weights), metadata={"format": "pt"})
    tiny_clip_tokenizer(path)
    return model


def meta_modeling():
    """segment_anything's ``modeling`` subpackage, loaded without the package ``__init__``.

    The package ``__init__`` imports its predictor, which needs torchvision; the model classes need
    only torch. Used here to make genuine Meta-format state dicts for the converter test.
    """
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or spec.origin is None:
        pytest.skip("segment_anything is not installed: no Meta reference model to compare with")
    name = "_aiflat_test_sa_modeling"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(spec.origin).parent / "modeling"
    ms = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    mod = importlib.util.module_from_spec(ms)
    sys.modules[name] = mod
    ms.loader.exec_module(mod)
    return mod


def build_meta_sam():
    """A tiny Meta ``Sam`` with random weights (8 decoder heads, as in SAM, so the converter's default fits)."""
    from functools import partial

    import torch

    mod = meta_modeling()
    torch.manual_seed(1)
    s, p = 64, 8
    sam = mod.Sam(
        image_encoder=mod.ImageEncoderViT(depth=2, embed_dim=16, img_size=s, mlp_ratio=2, num_heads=2,
                                          norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), patch_size=p,
                                          qkv_bias=True, use_rel_pos=True, global_attn_indexes=[1], window_size=4,
                                          out_chans=16),
        prompt_encoder=mod.PromptEncoder(embed_dim=16, image_embedding_size=(s // p, s // p), input_image_size=(s, s),
                                         mask_in_chans=4),
        mask_decoder=mod.MaskDecoder(num_multimask_outputs=3, transformer_dim=16, iou_head_depth=3,
                                     iou_head_hidden_dim=16,
                                     transformer=mod.TwoWayTransformer(depth=2, embedding_dim=16, mlp_dim=32,
                                                                       num_heads=8)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()
    with torch.no_grad():  # Meta zero-initialises some tensors: make every one of them matter
        for prm in sam.parameters():
            prm.normal_(0.0, 0.3)
    return sam


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A weights store with tiny SAM, SAM-HQ, SAM 2 and SAM 3 folders and a manifest naming them."""
    from aiflat_local.weights import WeightStore

    root = tmp_path_factory.mktemp("weights")
    build_sam(root / "sam-tiny")
    build_sam(root / "sam-hq-tiny", hq=True)
    build_sam2(root / "sam2-tiny")
    build_sam3(root / "sam3-tiny")
    kinds = {"sam-tiny": "sam-hf", "sam-hq-tiny": "sam_hq-hf", "sam2-tiny": "sam2-hf", "sam3-tiny": "sam3-hf"}
    models = [{"name": n, "kind": k, "path": n, "files": {"config.json": None, "model.safetensors": None},
               "licence": "test", "source": "test", "fetch": f"hf download test/{n} --local-dir {n}"}
              for n, k in kinds.items()]
    (root / "manifest.json").write_text(json.dumps({"format": 1, "models": models}))
    return WeightStore(root)


@pytest.fixture(scope="module")
def scene_image():
    """A seeded 96 x 128 simulated dusty reference (median of 3 frames) and its scene."""
    from aiflat_local.synth import SimConfig, iter_frames, make_scene

    scene = make_scene(SimConfig(height=96, width=128, n_frames=3, seed=3, n_dust=6, n_sunspots=0, n_pores=1))
    ref = np.median(np.stack(list(iter_frames(scene))), axis=0).astype(np.float32)
    return ref, scene


def window(shape=(40, 56), seed=0):
    return np.random.default_rng(seed).random(shape).astype(np.float32)


# --------------------------------------------------------------------------- loading each family
@pytest.mark.parametrize("name,family,k", [("sam-tiny", "sam", 3), ("sam-hq-tiny", "sam_hq", 3),
                                           ("sam2-tiny", "sam2", 3), ("sam3-tiny", "sam3_tracker", 3)])
def test_each_family_loads_from_its_folder_and_answers_points_and_boxes(store, name, family, k):
    from aiflat_local.masks._sam_models import load_backend

    resolved = store.resolve(name)
    assert set(resolved.sha256) == {"config.json", "model.safetensors"}
    backend = load_backend(resolved, prompt_mode="points")
    assert backend.family == family and backend.describe()["device"] == "cpu"
    emb = backend.embed(window())
    pts = np.array([[5.5, 7.5], [30.5, 20.5], [50.5, 35.5]])
    pred = backend.predict(emb, points=pts, multimask=True)
    assert pred.masks.shape == (3, k, 40, 56) and pred.masks.dtype == bool
    assert pred.scores.shape == (3, k) and np.isfinite(pred.scores).all()
    boxes = np.array([[2.0, 3.0, 20.0, 18.0], [30.0, 10.0, 56.0, 40.0]])
    pred = backend.predict(emb, boxes=boxes, multimask=False)
    assert pred.masks.shape == (2, 1, 40, 56) and pred.scores.shape == (2, 1)
    # the same prompts decoded twice against the cached embedding give the same masks
    again = backend.predict(emb, boxes=boxes, multimask=False)
    assert np.array_equal(again.masks, pred.masks)


def test_sam3_text_prompts_find_instances_with_the_reused_text_features(store):
    from aiflat_local.masks._sam_models import load_backend

    backend = load_backend(store.resolve("sam3-tiny"), prompt_mode="text")
    assert backend.family == "sam3" and backend.prompt_kinds == {"text"}
    emb = backend.embed(window((48, 48)))
    pred = backend.predict_text(emb, ["dust spot", "dark circular shadow"], threshold=0.0)
    # threshold 0: every query of every prompt is an instance (4 queries per prompt in the tiny model)
    assert pred.masks.shape == (8, 1, 48, 48) and pred.scores.shape == (8, 1)
    assert list(pred.prompt_index) == [0] * 4 + [1] * 4
    assert ((pred.scores > 0) & (pred.scores < 1)).all()
    assert set(backend._text) == {"dust spot", "dark circular shadow"}
    assert backend.predict_text(emb, ["dust spot"], threshold=1.0).masks.shape == (0, 1, 48, 48)


def test_prompt_kinds_a_model_cannot_serve_are_one_clear_error(store):
    from aiflat_local.masks._sam_models import load_backend

    with pytest.raises(BackendError, match=r"sam models take no text prompts; text needs a SAM 3 model"):
        load_backend(store.resolve("sam-tiny"), prompt_mode="text")
    with pytest.raises(BackendError, match=r"half precision \(dtype float16\) runs on CUDA only"):
        load_backend(store.resolve("sam-tiny"), prompt_mode="points", dtype="float16")
    with pytest.raises(BackendError, match=r"device 'tpu' is not supported"):
        load_backend(store.resolve("sam-tiny"), prompt_mode="points", device="tpu")


def test_preprocessing_matches_transformers_sam_processor():
    """Our torch preprocessing equals SamImageProcessor's (PIL backend) to within 8-bit rounding."""
    import torch
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    from aiflat_local.masks._sam_models import Preprocess

    img = (np.random.default_rng(0).random((40, 56)) * 255).astype(np.uint8)
    ref = SamImageProcessorPil(size={"longest_edge": 64}, pad_size={"height": 64, "width": 64})(
        images=np.stack([img] * 3, axis=-1), return_tensors="pt")
    prep = Preprocess(64)
    mine = prep.pixels(img.astype(np.float32) / 255.0, "cpu", torch.float32)
    assert tuple(ref["reshaped_input_sizes"][0].tolist()) == prep.resized_shape(40, 56) == (46, 64)
    # 8-bit resampling in PIL vs float here: at most ~1 grey level / (0.229 * 255) apart
    assert float((mine - ref["pixel_values"]).abs().max()) < 0.02


def test_coordinates_map_pixel_centres_and_masks_back_exactly():
    import torch

    from aiflat_local.masks._sam_models import Preprocess

    prep = Preprocess(64, mode="longest")
    # a 32 x 16 window is enlarged 2x to 64 x 32; the model adds 0.5 to coordinates
    out = prep.to_model(np.array([[0.5, 0.5], [16.0, 32.0]]), 32, 16)
    assert np.allclose(out, [[0.5, 0.5], [31.5, 63.5]])
    low = torch.full((1, 1, 16, 16), -5.0)
    low[0, 0, :, :8] = 1.0  # the valid part of a 16 x 16 low-res mask is 16 x 8; the rest is padding
    back = prep.to_window(low, 32, 16)
    assert back.shape == (1, 1, 32, 16) and bool((back == 1.0).all())
    square = Preprocess(64, mode="square")
    assert np.allclose(square.to_model(np.array([[8.0, 16.0]]), 32, 16), [[31.5, 31.5]])


# --------------------------------------------------------------------------- Meta checkpoints
def test_meta_checkpoint_is_converted_and_predicts_like_metas_own_model(tmp_path):
    import torch

    from aiflat_local.masks._sam_convert import config_from_state_dict, convert_state_dict
    from aiflat_local.masks._sam_models import MetaSamBackend, load_backend
    from aiflat_local.weights import WeightStore

    sam = build_meta_sam()
    state = sam.state_dict()
    cfg = config_from_state_dict(state)
    assert cfg["vision_config"]["num_attention_heads"] == 2 and cfg["vision_config"]["global_attn_indexes"] == [1]
    assert cfg["vision_config"]["window_size"] == 4 and cfg["vision_config"]["image_size"] == 64
    assert "shared_image_embedding.positional_embedding" in convert_state_dict(state)
    ckpt = tmp_path / "sam_vit_tiny.pth"
    torch.save(state, ckpt)
    converted = load_backend(WeightStore(tmp_path / "store").resolve(ckpt), prompt_mode="points")
    meta = MetaSamBackend(sam, torch.device("cpu"), torch.float32)
    win = window((40, 56), seed=4)
    a, b = converted.embed(win), meta.embed(win)
    assert float((a.data - b.data).abs().max()) < 1e-5
    for kw in ({"points": np.array([[5.5, 7.5], [40.5, 30.5]]), "multimask": True},
               {"boxes": np.array([[2.0, 3.0, 30.0, 25.0]]), "multimask": False}):
        pa, pb = converted.predict(a, **kw), meta.predict(b, **kw)
        assert np.allclose(pa.scores, pb.scores, atol=1e-5)
        assert (pa.masks == pb.masks).mean() > 0.999  # logits equal to ~1e-6; a pixel may sit on 0


def test_segment_anything_package_is_used_where_it_imports_and_says_why_not(tmp_path):
    import torch

    from aiflat_local.masks._sam_models import load_backend
    from aiflat_local.weights import WeightStore

    ckpt = tmp_path / "sam_vit_tiny.pth"
    torch.save(build_meta_sam().state_dict(), ckpt)
    resolved = WeightStore(tmp_path / "store").resolve(ckpt)
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        with pytest.raises(BackendError, match=r"segment_anything package does not import here .*torchvision.*"
                                               r"meta_loader='converter'"):
            load_backend(resolved, prompt_mode="points", meta_loader="segment_anything")
    else:  # where torchvision works: Meta's registry only builds ViT-B/L/H, so a tiny checkpoint is refused
        with pytest.raises(WeightsError, match="not one of ViT-B/L/H"):
            load_backend(resolved, prompt_mode="points", meta_loader="segment_anything")


def test_a_checkpoint_that_is_not_sam_is_refused(tmp_path):
    import torch

    from aiflat_local.masks._sam_models import load_backend
    from aiflat_local.weights import WeightStore

    ckpt = tmp_path / "other.pth"
    torch.save({"layer.weight": torch.zeros(2, 2)}, ckpt)
    with pytest.raises(WeightsError, match="not a Segment Anything \\(v1\\) checkpoint in Meta's format"):
        load_backend(WeightStore(tmp_path).resolve(ckpt), prompt_mode="points")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(WeightsError, match="model type 'bert' is not a SAM-family model"):
        load_backend(WeightStore(tmp_path).resolve(tmp_path / "folder"), prompt_mode="points")


# --------------------------------------------------------------------------- the whole masker, tiny models
@pytest.mark.parametrize("name,mode", [("sam-tiny", "points"), ("sam-hq-tiny", "boxes"), ("sam2-tiny", "points")])
def test_masker_runs_on_a_simulated_image_with_a_stored_model(store, scene_image, name, mode):
    from aiflat_local.masks import MASKERS

    ref, _ = scene_image
    classical = MASKERS.create("classical")(ref)
    masker = MASKERS.create("sam", model=name, weights_dir=str(store.directory), prompt_mode=mode,
                            tile_px=64, overlap_px=16)
    result = masker(ref)
    assert result.mask.shape == ref.shape and result.mask.dtype == np.float32
    assert set(np.unique(result.mask)) <= {0.0, 1.0}
    p = result.params
    assert p["backend"] == "sam" and p["model"] == name and p["prompt_mode"] == mode
    assert p["model_files"]["sha256"]["model.safetensors"] == store.resolve(name).sha256["model.safetensors"]
    assert p["proposer"] == "classical" and p["proposer_result"]["n_objects"] == len(classical.objects)
    assert p["n_candidates"] == len(classical.objects) > 0 and p["n_prompts"] == p["n_candidates"]
    assert 1 <= p["n_windows"] <= p["n_candidates"]
    # every candidate ends in the mask: SAM's mask for it, or (random model) the proposer's own
    labels, n = ndimage.label(classical.binary, structure=EIGHT)
    for lab in range(1, n + 1):
        assert result.binary[labels == lab].any(), lab
    json.dumps(result.params), json.dumps(result.objects)


def test_masker_with_sam3_text_prompts_runs_on_a_simulated_image(store, scene_image):
    from aiflat_local.masks import MASKERS

    ref, _ = scene_image
    masker = MASKERS.create("sam", model="sam3-tiny", weights_dir=str(store.directory), prompt_mode="text",
                            text_prompts=["dust spot"], text_threshold=0.0, tile_px=56, overlap_px=16)
    result = masker(ref)
    p = result.params
    from aiflat_local.masks._sam_tiles import tile_grid

    n = len(tile_grid(ref.shape, 56, 16))
    assert p["n_windows"] == n == p["n_prompts"] and p["model_backend"]["family"] == "sam3"
    assert result.mask.shape == ref.shape
    assert sum(p["rejected"].values()) + p["n_objects"] + p["n_duplicates"] == n * 4  # 4 instances per window


def test_masker_options_are_checked_when_it_is_created(store, tmp_path):
    from aiflat_local.masks import MASKERS

    d = str(store.directory)
    with pytest.raises(BackendError, match="prompt_mode must be one of points, boxes, text, grid"):
        MASKERS.create("sam", model="sam-tiny", weights_dir=d, prompt_mode="auto")
    with pytest.raises(BackendError, match=r"dtype float16\) runs on CUDA only"):
        MASKERS.create("sam", model="sam-tiny", weights_dir=d, dtype="float16")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(BackendError, match="sees no CUDA device here; use --device cpu"):
            MASKERS.create("sam", model="sam-tiny", weights_dir=d, device="cuda")
    with pytest.raises(WeightsError, match=r"neither a model of the weights store"):
        MASKERS.create("sam", model="nope", weights_dir=d)
    masker = MASKERS.create("sam", model="sam2-tiny", weights_dir=d, prompt_mode="text")
    with pytest.raises(BackendError, match="sam2 models take no text prompts"):
        masker(np.ones((32, 32), np.float32))


def test_cli_mask_with_missing_weights_is_one_line_and_writes_nothing(tmp_path, cli, monkeypatch):
    from aiflat_local.io import write_fits

    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "manifest.json").write_text(json.dumps({"models": [{
        "name": "sam-vit-base", "kind": "sam-hf", "path": "sam-vit-base",
        "files": {"config.json": None, "model.safetensors": None}, "licence": "Apache-2.0",
        "source": "https://huggingface.co/facebook/sam-vit-base",
        "fetch": "hf download facebook/sam-vit-base --local-dir sam-vit-base"}]}))
    monkeypatch.setenv("AIFLAT_WEIGHTS", str(tmp_path / "weights"))
    write_fits(tmp_path / "img.fits", np.ones((32, 32), np.float32))
    code, out, err = cli("mask", tmp_path / "img.fits", "-o", tmp_path / "m.png", "--masker", "sam",
                         "--sam-model", "sam-vit-base")
    assert code != 0 and not (tmp_path / "m.png").exists()
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "missing file" in lines[0] and "config.json" in lines[0] and "hf download facebook/sam-vit-base" in lines[0]


def test_cli_run_with_a_stored_sam_model_end_to_end_offline(store, small_video, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("AIFLAT_WEIGHTS", str(store.directory))
    out = tmp_path / "out"
    code, _, err = cli("run", small_video.video, "-o", out, "--masker", "sam", "--sam-model", "sam-tiny",
                       "--masker-option", "tile_px=64", "--masker-option", "overlap_px=16", "--quiet")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    text = json.dumps(report)
    assert store.resolve("sam-tiny").sha256["model.safetensors"] in text  # the weights' checksum is recorded
    assert (out / "mask.png").is_file() and (out / "calibrated.ser").is_file()


@pytest.mark.gpu
def test_half_precision_on_cuda(store):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from aiflat_local.masks._sam_models import load_backend

    backend = load_backend(store.resolve("sam-tiny"), prompt_mode="points", device="cuda", dtype="float16")
    pred = backend.predict(backend.embed(window()), points=np.array([[5.5, 7.5]]))
    assert pred.masks.shape == (1, 3, 40, 56) and pred.scores.dtype == np.float32


# --------------------------------------------------------------------------- deterministic fakes
class ThresholdBackend:
    """A fake SAM: it 'segments' the dark connected regions of the window it is shown.

    For a point prompt it answers three masks: the whole window (score 0.99: must be rejected as too
    large), the dark region under the point (0.9: the right answer) and another dark region (0.8: off
    target). For a box: the dark region with most pixels in the box. For text: every dark region.
    Masks are cut at the window's edges, as a real model's would be.
    """

    family = "fake"
    prompt_kinds = frozenset({"points", "boxes", "text"})

    def __init__(self, level: float = 0.4):
        self.level = level
        self.windows: list[tuple[int, int]] = []

    def describe(self):
        return {"family": self.family}

    def embed(self, win):
        from aiflat_local.masks._sam_models import Embedding

        self.windows.append(win.shape)
        labels, n = ndimage.label(win < self.level, structure=EIGHT)
        return Embedding((labels, n), *win.shape)

    def predict(self, emb, *, points=None, boxes=None, multimask=True):
        from aiflat_local.masks._sam_models import Prediction

        labels, n = emb.data
        prompts = points if points is not None else boxes
        k = 3 if multimask else 1
        masks = np.zeros((len(prompts), k, emb.height, emb.width), bool)
        scores = np.zeros((len(prompts), k), np.float32)
        for i, pr in enumerate(prompts):
            if points is not None:
                lab = labels[int(pr[1]), int(pr[0])]
            else:
                x0, y0, x1, y1 = (int(round(v)) for v in pr)
                counts = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n + 1)
                counts[0] = 0
                lab = int(np.argmax(counts))
            if multimask:
                masks[i, 0], scores[i, 0] = True, 0.99
                masks[i, 1], scores[i, 1] = labels == lab, 0.9
                other = 1 + lab % n if n > 1 else 0
                masks[i, 2], scores[i, 2] = labels == other, 0.8
            else:
                masks[i, 0], scores[i, 0] = labels == lab, 0.9
        return Prediction(masks, scores)

    def predict_text(self, emb, prompts, *, threshold):
        from aiflat_local.masks._sam_models import Prediction

        labels, n = emb.data
        masks = np.stack([labels == i for i in range(1, n + 1)])[:, None] if n else \
            np.zeros((0, 1, emb.height, emb.width), bool)
        return Prediction(masks, np.full((n, 1), 0.9, np.float32), np.zeros(n, np.int64))


def disk_image(shape=(150, 170)):
    """Flat 1000 ADU with hard-edged dark disks, some across tile borders, one large and shallow.

    Returns (image, truth mask). With 64 px tiles overlapping by 16 (starts 0, 48, 86 in y and
    0, 48, 96, 106 in x) the disks at x = 58 and x = 66 reach or cross the right edge of the first
    tile; the 49 px disk fits no tile with its box margin (so it gets its own crop) but fits one
    tile whole (grid and text see it whole there). Depths are plausible for dust of each size.
    """
    img = np.full(shape, 1000.0, np.float32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    truth = np.zeros(shape, bool)
    for (y, x, r, depth) in [(20, 20, 5, 0.2), (30, 58, 5, 0.2), (12, 66, 4, 0.3), (125, 140, 6, 0.15),
                             (80, 80, 24, 0.08), (60, 124, 4, 0.25)]:
        d = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
        img[d] *= 1 - depth
        truth |= d
    return img, truth


@pytest.mark.parametrize("mode", ["points", "boxes", "grid", "text"])
def test_stitched_mask_is_exactly_the_objects_whatever_the_tile_borders(mode):
    from aiflat_local.masks.sam import SamMasker

    img, truth = disk_image()
    fake = ThresholdBackend()
    masker = SamMasker(backend=fake, prompt_mode=mode, tile_px=64, overlap_px=16, grid_points_per_side=8,
                       grid_min_score=0.5, text_threshold=0.5, max_window_fraction=0.5)
    result = masker(img)
    assert np.array_equal(result.binary, truth)
    p = result.params
    assert p["n_objects"] == 6 and len(result.objects) == 6 and p["n_fallback"] == 0
    if mode in ("points", "boxes"):
        assert p["n_candidates"] == 6 and p["n_prompts"] == 6
        kinds = sorted(fake.windows)
        assert kinds.count((64, 64)) == p["n_windows"] - 1  # one crop for the large disk
        assert p["rejected"] == {}
        assert {o["source"] for o in result.objects} == {mode}
        assert all(o["score"] == 0.9 for o in result.objects)  # the whole-window mask (0.99) was refused
    else:
        assert p["n_windows"] == 12 and p["rejected"].get("cut_by_tile", 0) > 0
        assert p["rejected"].get("other_tile", 0) + p["n_duplicates"] > 0


def test_fallback_keeps_the_proposers_mask_when_sam_gives_nothing_usable():
    from aiflat_local.masks._sam_models import Prediction
    from aiflat_local.masks.sam import SamMasker

    class Useless(ThresholdBackend):
        def predict(self, emb, *, points=None, boxes=None, multimask=True):
            n = len(points)
            return Prediction(np.ones((n, 1, emb.height, emb.width), bool), np.full((n, 1), 0.9, np.float32))

    img, truth = disk_image()
    from aiflat_local.masks import MASKERS

    classical = MASKERS.create("classical")(img).binary
    result = SamMasker(backend=Useless(), tile_px=64, overlap_px=16)(img)
    assert result.params["n_fallback"] == 6 and result.params["rejected"] == {"large": 6}
    assert np.array_equal(result.binary, classical)
    assert {o["source"] for o in result.objects} == {"proposer"}
    nothing = SamMasker(backend=Useless(), tile_px=64, overlap_px=16, fallback=False)(img)
    assert not nothing.binary.any() and nothing.params["n_objects"] == 0


def test_no_candidates_means_no_model_call():
    from aiflat_local.masks.sam import SamMasker

    fake = ThresholdBackend()
    result = SamMasker(backend=fake)(np.full((64, 80), 500.0, np.float32))
    assert not result.binary.any() and fake.windows == [] and result.params["n_candidates"] == 0


# --------------------------------------------------------------------------- the parts on their own
def test_candidates_points_and_boxes_from_a_proposer_mask():
    from aiflat_local.masks._sam_prompts import box_prompts, candidates_from_mask, grid_points, point_prompts

    img = np.full((40, 50), 100.0, np.float32)
    yy, xx = np.mgrid[:40, :50]
    r = np.hypot(yy - 20, xx - 15)
    img[(r >= 3) & (r <= 6)] = 60.0  # a donut: dark ring, bright centre
    img[20, 21] = 40.0  # its darkest pixel, on the ring (right side)
    img[30:33, 40:44] = 80.0
    mask = r <= 6.5
    mask[30:33, 40:44] = True
    cands = candidates_from_mask(mask, img, smooth_px=0)
    assert [c.bbox for c in cands] == [(14, 9, 27, 22), (30, 40, 33, 44)]
    assert cands[0].point == (21.5, 20.5)  # (x, y) centre of pixel row 20, column 21
    assert cands[1].point == (40.5, 30.5)  # uniform: the first pixel in row-major order
    assert np.allclose(point_prompts(cands, offset=(10, 5)), [[16.5, 10.5], [35.5, 20.5]])
    # boxes grow by max(2 px, 25 % of the side), clipped to the image, relative to the window corner
    assert np.allclose(box_prompts(cands, (40, 50), offset=(10, 5)),
                       [[0, 0, 21, 21], [33, 18, 41, 25]])
    # two touching shadows that the proposer reported as two objects stay two candidates
    pair = np.zeros((20, 30), bool)
    pair[5:10, 3:13] = True
    pair[5:10, 13:23] = True
    split = candidates_from_mask(pair, np.ones((20, 30)), centers=[(7.0, 7.5), (7.0, 18.0)], smooth_px=0)
    assert [c.bbox for c in split] == [(5, 3, 10, 13), (5, 13, 10, 23)]
    assert len(candidates_from_mask(pair, np.ones((20, 30)))) == 1
    g = grid_points(20, 40, 2)
    assert np.allclose(g, [[10, 5], [30, 5], [10, 15], [30, 15]])


def test_tiles_cover_the_image_and_their_cores_partition_it():
    from aiflat_local.masks._sam_tiles import axis_starts, tile_grid

    assert axis_starts(170, 64, 16) == [0, 48, 96, 106]
    assert axis_starts(50, 64, 16) == [0]
    tiles = tile_grid((150, 170), 64, 16)
    owners = np.zeros((150, 170), int)
    cover = np.zeros((150, 170), int)
    for t in tiles:
        cy0, cx0, cy1, cx1 = t.core
        owners[cy0:cy1, cx0:cx1] += 1
        cover[t.slices()] += 1
        assert t.shape == (64, 64) and t.y0 <= cy0 and cy1 <= t.y1 and t.x0 <= cx0 and cx1 <= t.x1
    assert (owners == 1).all() and (cover >= 1).all()
    # the core boundary is the middle of the overlap: between tiles at 0 and 48 (overlap 48-63) -> 56
    assert tiles[0].core[3] == 56 and tiles[1].core[1] == 56


def test_candidates_go_to_a_tile_that_holds_them_whole_or_to_their_own_crop():
    from aiflat_local.masks._sam_prompts import Candidate
    from aiflat_local.masks._sam_tiles import assign_candidates, tile_grid, touches_inner_edge

    def cand(i, y0, x0, y1, x1):
        return Candidate(i, ((x0 + x1) / 2, (y0 + y1) / 2), (y0, x0, y1, x1), np.ones((y1 - y0, x1 - x0), bool))

    tiles = tile_grid((150, 170), 64, 16)
    cs = [cand(0, 10, 10, 20, 20), cand(1, 10, 58, 20, 68), cand(2, 80, 60, 121, 101)]
    groups = assign_candidates(cs, tiles, (150, 170), margin=0.25, margin_px=2, crop_min_px=64)
    where = {c.index: w for w, group in groups for c in group}
    assert where[0] == tiles[0]
    # centre x = 63 lies in the second tile's core (x >= 56) and its grown box (7, 55, 23, 71) fits it
    assert where[1] == tiles[1] and where[1].x0 == 48 and where[1].contains_box((7, 55, 23, 71))
    # 41 px + 11 px margins = 63 px > 64 - 1: its own 126 px crop, shifted inside the image
    assert where[2].kind == "crop" and where[2].shape == (126, 126) and where[2].offset == (24, 18)
    assert where[2].contains_box((69, 49, 132, 112))
    win = tiles[0]
    assert touches_inner_edge(np.ones((3, 3), bool), (10, 61), win, (150, 170))  # reaches x = 63
    assert not touches_inner_edge(np.ones((3, 3), bool), (0, 0), win, (150, 170))  # image border only


def test_filters_name_the_reason_a_mask_is_not_dust():
    from aiflat_local.masks._sam_filter import FilterParams, ObjectMask, measure, reject_reason

    img = np.full((80, 80), 1000.0, np.float32)
    yy, xx = np.mgrid[:80, :80]
    disk = np.hypot(yy - 40, xx - 40) <= 5
    img[disk] = 900.0  # 10 % dip
    p = FilterParams()

    def reason(mask, image=img, window_area=None):
        obj = ObjectMask.from_mask(mask)
        return reject_reason(measure(obj, image, 150.0), p, window_area), obj.stats

    r, s = reason(disk)
    assert r is None and s["contrast"] == pytest.approx(0.1, abs=1e-6) and s["extent"] == pytest.approx(1.0, abs=0.06)
    assert s["y"] == pytest.approx(40.0) and s["x"] == pytest.approx(40.0)
    assert reason(disk & (yy == 40) & (xx >= 39) & (xx < 42))[0] == "small"
    assert reason(np.hypot(yy - 40, xx - 40) <= 30, window_area=80 * 80)[0] == "large"
    line = (abs(yy - 40) <= 1) & (abs(xx - 40) <= 12)
    assert reason(line)[0] == "elongated"
    cross = ((abs(yy - 40) <= 1) & (abs(xx - 40) <= 15)) | ((abs(xx - 40) <= 1) & (abs(yy - 40) <= 15))
    r, s = reason(cross)
    assert r == "not_compact" and s["elongation"] == pytest.approx(1.0) and s["extent"] < 0.6
    bright = img.copy()
    bright[disk] = 1100.0
    assert reason(disk, bright)[0] == "not_dark"
    spot = img.copy()
    big = np.hypot(yy - 40, xx - 40) <= 15
    spot[big] = 300.0  # 70 % deep and 31 px across: a sunspot, not dust
    assert reason(big, spot)[0] == "too_dark"
    sky = img.copy()
    sky[:, 50:] = 10.0
    assert reason(disk, sky)[0] == "sky"


def test_merge_keeps_one_mask_per_shadow_by_rank():
    from aiflat_local.masks._sam_filter import ObjectMask, component, merge, paint

    a = ObjectMask(np.ones((10, 10), bool), 0, 0, score=0.9)
    b = ObjectMask(np.ones((10, 10), bool), 2, 2, score=0.95)
    c = ObjectMask(np.ones((4, 4), bool), 3, 3, score=0.99)  # inside a and b, best score
    d = ObjectMask(np.ones((5, 5), bool), 30, 30, source="proposer")
    e = ObjectMask(np.ones((5, 5), bool), 31, 31, score=0.1)  # with d: IoU 16/34 = 0.47, inside 16/25 = 0.64
    f = ObjectMask(np.ones((10, 10), bool), 50, 50, score=0.5)
    g = ObjectMask(np.ones((10, 10), bool), 50, 51, score=0.6)  # with f: IoU 90/110 = 0.82
    kept, dropped = merge([a, b, c, d, e, f, g], iou=0.5, contain=0.8)
    # rank: c (0.99), b, a, g, f, e (0.1), then the proposer's d; b and a hold c: same shadow
    assert [id(k) for k in kept] == [id(c), id(g), id(e), id(d)] and dropped == 3
    kept, dropped = merge([a, b, c, d, e], iou=0.4, contain=0.6)
    assert [id(k) for k in kept] == [id(c), id(e)] and dropped == 3
    m = paint((40, 40), kept)
    assert m.sum() == 16 + 25 and m[3:7, 3:7].all() and m[31:36, 31:36].all()


def test_component_fills_holes_and_keeps_the_part_under_the_point():
    from aiflat_local.masks._sam_filter import component

    ring = np.zeros((10, 10), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    ring[9, 9] = True  # a separate speck
    assert component(ring, point=(1, 1)).sum() == 49  # the donut, hole filled
    assert component(ring, point=(9, 9)).sum() == 1
    assert component(ring, point=(0, 4)).sum() == 49  # on nothing: the nearest part
    assert component(ring).sum() == 49  # no point: the largest

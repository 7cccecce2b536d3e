"""The local model store: names or paths, checksums before unpickling, never the network."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from aiflat_local.errors import WeightsError


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a host name fails the test loudly."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:2])
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


def write_manifest(directory, models):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps({"format": 1, "models": models}))


def tiny_sam_folder(path):
    """A tiny random SamModel saved with save_pretrained (config.json + model.safetensors)."""
    from aiflat_local.masks._sam_tiny import write_tiny_sam

    return write_tiny_sam(path, image_size=32, num_hidden_layers=1)


# --------------------------------------------------------------------------- offline mode
def test_force_offline_sets_the_hub_offline(monkeypatch):
    import huggingface_hub.constants as hc

    from aiflat_local.weights import force_offline

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    force_offline()
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert hc.HF_HUB_OFFLINE is True and hc.is_offline_mode()


def test_missing_weights_fail_clearly_without_touching_the_network(tmp_path, no_network):
    from aiflat_local.weights import WeightStore, load_pretrained

    write_manifest(tmp_path, [{
        "name": "sam-tiny", "kind": "sam-hf", "path": "sam-tiny",
        "files": {"config.json": None, "model.safetensors": None},
        "licence": "Apache-2.0", "source": "https://example.org/sam-tiny",
        "fetch": "hf download org/sam-tiny --local-dir sam-tiny",
    }])
    store = WeightStore(tmp_path)
    with pytest.raises(WeightsError, match=r"missing file .*sam-tiny.*config\.json.*hf download org/sam-tiny"):
        store.resolve("sam-tiny")
    # a repository id is not a path and is never looked up on the hub
    with pytest.raises(WeightsError, match=r"neither a model of the weights store .* nor an existing file"):
        store.resolve("facebook/sam-vit-base")
    # a folder with a config but no weights: the loader says which file, and does not download
    from transformers import SamModel

    (tmp_path / "sam-tiny").mkdir()
    (tmp_path / "sam-tiny" / "config.json").write_text(json.dumps({"model_type": "sam"}))
    with pytest.raises(WeightsError, match=r"missing weights in .*sam-tiny: expected one of model\.safetensors"):
        load_pretrained(SamModel, tmp_path / "sam-tiny")
    with pytest.raises(WeightsError, match=r"missing file .*model\.safetensors"):
        store.resolve("sam-tiny")
    assert no_network == []


def test_plain_from_pretrained_with_a_repo_id_does_not_download_once_offline(no_network):
    """After force_offline even transformers' own loader fails at once for a repo id it lacks."""
    from transformers import SamModel

    from aiflat_local.weights import force_offline

    force_offline()
    with pytest.raises(OSError):
        SamModel.from_pretrained("aiflat-local-test/no-such-model", local_files_only=False)
    assert no_network == []


# --------------------------------------------------------------------------- resolve
def test_resolve_by_name_and_by_path_and_load_offline(tmp_path, no_network):
    import torch
    from transformers import SamModel

    from aiflat_local.weights import WeightStore, load_pretrained, sha256_file

    model = tiny_sam_folder(tmp_path / "store" / "sam-tiny")
    sha = sha256_file(tmp_path / "store" / "sam-tiny" / "model.safetensors")
    write_manifest(tmp_path / "store", [{
        "name": "sam-tiny", "kind": "sam-hf", "path": "sam-tiny",
        "files": {"config.json": None, "model.safetensors": sha},
        "licence": "x", "source": "x", "fetch": "x",
    }])
    store = WeightStore(tmp_path / "store")
    by_name = store.resolve("sam-tiny")
    assert by_name.path == tmp_path / "store" / "sam-tiny" and by_name.kind == "sam-hf" and by_name.verified
    assert by_name.sha256["model.safetensors"] == sha and len(by_name.sha256["config.json"]) == 64
    # the same folder given as a path uses the store's recorded checksums
    by_path = store.resolve(str(tmp_path / "store" / "sam-tiny"))
    assert by_path.name == "sam-tiny" and by_path.verified
    # a folder outside the store: kind guessed from config.json, files hashed for provenance
    import shutil

    shutil.copytree(tmp_path / "store" / "sam-tiny", tmp_path / "elsewhere")
    outside = store.resolve(tmp_path / "elsewhere")
    assert outside.kind == "sam-hf" and not outside.verified
    assert outside.sha256["model.safetensors"] == sha
    loaded = load_pretrained(SamModel, outside.path)
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    # corrupted weights: refused before loading
    (tmp_path / "store" / "sam-tiny" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"model\.safetensors is corrupted or a different version"):
        store.resolve("sam-tiny")
    assert no_network == []


def test_load_pretrained_refuses_weights_that_do_not_fit(tmp_path):
    from transformers import SamHQModel

    from aiflat_local.weights import load_pretrained

    tiny_sam_folder(tmp_path / "sam")  # a SAM v1 folder is not a SAM-HQ model: HQ tensors missing
    (tmp_path / "sam" / "config.json").write_text(
        (tmp_path / "sam" / "config.json").read_text().replace('"model_type": "sam"', '"model_type": "sam_hq"'))
    with pytest.raises(WeightsError, match=r"the weights do not fit SamHQModel \(\d+ tensors missing"):
        load_pretrained(SamHQModel, tmp_path / "sam")


# --------------------------------------------------------------------------- pickles
def test_pickled_checkpoint_needs_its_checksum_first_and_weights_only(tmp_path, monkeypatch):
    import torch

    from aiflat_local.weights import load_state_dict, sha256_file

    state = {"a.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    path = tmp_path / "ckpt.pth"
    torch.save({"model": state}, path)
    good = sha256_file(path)
    out = load_state_dict(path, expected_sha256=good)
    assert list(out) == ["a.weight"] and torch.equal(out["a.weight"], state["a.weight"])

    # a checksum mismatch is refused before torch.load is ever called
    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k) or real_load(*a, **k))
    with pytest.raises(WeightsError, match=r"ckpt\.pth is corrupted or a different version"):
        load_state_dict(path, expected_sha256="0" * 64)
    assert calls == []
    load_state_dict(path)
    assert calls and calls[-1]["weights_only"] is True

    # a pickle that would run code is refused by weights_only=True
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(WeightsError, match=r"evil\.pth: not a plain tensor checkpoint, refused"):
        load_state_dict(evil)


def test_safetensors_are_read_without_pickle(tmp_path):
    import torch
    from safetensors.torch import save_file

    from aiflat_local.weights import load_state_dict

    path = tmp_path / "w.safetensors"
    save_file({"b": torch.ones(3)}, str(path))
    assert torch.equal(load_state_dict(path)["b"], torch.ones(3))
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(WeightsError, match="unreadable safetensors file"):
        load_state_dict(path)
    with pytest.raises(WeightsError, match="missing weights file"):
        load_state_dict(tmp_path / "absent.safetensors")


def test_model_files_lists_what_loading_reads(tmp_path):
    from aiflat_local.weights import model_files

    d = tmp_path / "m"
    d.mkdir()
    for f in ("config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5", "preprocessor_config.json"):
        (d / f).write_bytes(b"{}")
    assert model_files(d) == ["config.json", "preprocessor_config.json", "model.safetensors"]
    assert model_files(d / "pytorch_model.bin") == ["pytorch_model.bin"]
    assert np.array_equal(np.array(model_files(tmp_path / "none")), np.array([]))


def test_shipped_manifest_lists_the_sam_family_with_fetch_commands():
    from pathlib import Path

    from aiflat_local.weights import WeightStore

    store = WeightStore(Path(__file__).resolve().parent.parent / "weights")
    sam = {n: e for n, e in store.models.items() if e["kind"].startswith(("sam", "sam2", "sam3"))}
    kinds = {e["kind"] for e in sam.values()}
    assert {"sam-hf", "sam_hq-hf", "sam2-hf", "sam3-hf", "sam-meta-checkpoint"} <= kinds
    for name, e in sam.items():
        assert e["fetch"].startswith(("hf download ", "curl ")), name
        assert "--local-dir" in e["fetch"] or e["kind"] == "sam-meta-checkpoint", name
        assert e["files"], name

"""Package-level promises: a light import, registries, the weights store never downloads."""

import json
import subprocess
import sys

import pytest

from aiflat_local.errors import BackendError, WeightsError


def test_import_is_light():
    code = (
        "import sys, aiflat_local, aiflat_local.masks, aiflat_local.inpaint, aiflat_local.pipeline, aiflat_local.cli;"
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'segment_anything') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_registries_list_backends_and_reject_unknown_names():
    from aiflat_local.inpaint import INPAINTERS
    from aiflat_local.masks import MASKERS

    assert "classical" in MASKERS.names()
    assert {"harmonic", "biharmonic"} <= set(INPAINTERS.names())
    with pytest.raises(BackendError, match="unknown masker 'nope'; available: .*classical"):
        MASKERS.create("nope")


def make_store(tmp_path, sha=None):
    (tmp_path / "manifest.json").write_text(json.dumps({"models": [{
        "name": "tiny", "kind": "sam-hf", "path": "tiny", "files": {"config.json": sha},
        "fetch": "hf download org/tiny --local-dir tiny", "source": "https://example.org",
    }]}))
    from aiflat_local.weights import WeightStore

    return WeightStore(tmp_path)


def test_missing_weights_say_which_file_and_how_to_get_it(tmp_path):
    store = make_store(tmp_path)
    assert store.status("tiny") == "missing"
    with pytest.raises(WeightsError, match=r"missing file .*config.json.*hf download org/tiny"):
        store.require("tiny")
    assert "hf download org/tiny" in store.describe()


def test_corrupted_weights_fail_verification(tmp_path):
    import hashlib

    good = b'{"a": 1}'
    store = make_store(tmp_path, sha=hashlib.sha256(good).hexdigest())
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_bytes(good)
    assert store.require("tiny") == tmp_path / "tiny"
    (tmp_path / "tiny" / "config.json").write_bytes(b'{"a": 2}')
    with pytest.raises(WeightsError, match="corrupted"):
        store.require("tiny")
    assert store.verify_all(log=lambda s: None) == 1


def test_import_records_checksums(tmp_path):
    from aiflat_local.weights import WeightStore, sha256_file

    src = tmp_path / "download" / "mymodel"
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "sam"}')
    store = WeightStore(tmp_path / "store")
    entry = store.import_path(src)
    assert entry["kind"] == "sam-hf"
    assert entry["files"]["config.json"] == sha256_file(src / "config.json")
    again = WeightStore(tmp_path / "store")
    assert again.status("mymodel") == "present" and again.verify_all(log=lambda s: None) == 0
    with pytest.raises(WeightsError, match="already exists"):
        store.import_path(src)


def test_shipped_manifest_is_valid():
    from pathlib import Path

    from aiflat_local.weights import WeightStore

    store = WeightStore(Path(__file__).resolve().parent.parent / "weights")
    assert store.models, "weights/manifest.json lists no models"
    for name, entry in store.models.items():
        assert {"kind", "path", "files", "licence", "source", "fetch"} <= set(entry), name


def test_unknown_backend_option_is_one_clear_error():
    from aiflat_local.masks import MASKERS

    with pytest.raises(BackendError, match="masker 'classical' has no option bogus"):
        MASKERS.create("classical", bogus=3)

"""The model manager: real fetch from the registry, cache reuse, corrupt and interrupted entries."""

from __future__ import annotations

import json
import shutil

import pytest

from server import models
from server.models import ModelError, ensure_model, is_cached, resolve_model


def test_cached_small_model_is_complete(smollm2_path):
    manifest = json.loads((smollm2_path / models.MANIFEST).read_text())
    assert manifest["gguf_sha256"] == models.EMBEDDED_MODELS["smollm2-135m"].gguf_sha256
    config = json.loads((smollm2_path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert "quantization_config" not in config
    assert is_cached("smollm2-135m")


def test_cache_reuse_does_not_touch_the_network(smollm2_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(models, "_pip_download", no_network)
    assert ensure_model("smollm2-135m", progress=False) == smollm2_path


def test_loaded_model_generates_code(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    text = tokenizer.decode(out[0][ids["input_ids"].shape[1]:])
    assert "a" in text and "b" in text


def _copy_home(tmp_path, monkeypatch, smollm2_path):
    home = tmp_path / "home"
    shutil.copytree(smollm2_path, home / "models" / "smollm2-135m")
    monkeypatch.setenv("DYNARANK_HOME", str(home))
    return home / "models" / "smollm2-135m"


def test_corrupt_cache_entry_is_detected_and_fetched_again(tmp_path, monkeypatch, smollm2_path):
    entry = _copy_home(tmp_path, monkeypatch, smollm2_path)
    assert is_cached("smollm2-135m")
    (entry / "model.safetensors").write_bytes(b"")  # a crash while writing weights
    assert not is_cached("smollm2-135m")

    path = ensure_model("smollm2-135m", progress=False)  # real download and conversion

    assert path == entry
    assert is_cached("smollm2-135m")
    assert (entry / "model.safetensors").stat().st_size > 100_000_000
    assert [p.name for p in entry.parent.iterdir()] == ["smollm2-135m"]  # no temp dirs left


def test_interrupted_fetch_leaves_no_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNARANK_HOME", str(tmp_path / "home"))

    def crash(gguf_path, out, *, progress):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # half-written output
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        ensure_model("smollm2-135m", progress=False)
    models_root = tmp_path / "home" / "models"
    assert not is_cached("smollm2-135m")
    assert list(models_root.iterdir()) == []


def test_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNARANK_HOME", str(tmp_path / "home"))
    spec = models.EMBEDDED_MODELS["smollm2-135m"]
    bad = models.EmbeddedModel(spec.name, spec.description, spec.parts, spec.gguf_size, "0" * 64)
    monkeypatch.setitem(models.EMBEDDED_MODELS, "smollm2-135m", bad)
    with pytest.raises(ModelError, match="sha256"):
        ensure_model("smollm2-135m", progress=False)
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model 'gpt-17'.*qwen2.5-coder-0.5b"):
        resolve_model("gpt-17")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(tmp_path)


def test_local_model_directory_is_accepted(smollm2_path):
    assert resolve_model(str(smollm2_path)) == smollm2_path

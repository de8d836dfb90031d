"""Generation engines, chosen by name (``--engine``) from ``ENGINES``.

Each entry builds an ``Engine`` (``server/engines/base.py``) from the settings
and the loaded hf model. Training always runs on that hf model; an engine only
decides where generation runs. Builders import their engine lazily, so vLLM is
needed only when it is asked for.
"""

from __future__ import annotations

from typing import Callable

from server.engines.base import Engine


def _hf(settings, model, tokenizer) -> Engine:
    from server.engines.hf import HFEngine

    return HFEngine(model, tokenizer, settings.served_name)


def _vllm(settings, model, tokenizer) -> Engine:
    from server.engines.vllm import build_vllm_engine

    # Generation moves to vLLM (loading the same weights again); training stays on `model`.
    return build_vllm_engine(settings, tokenizer, getattr(model, "name_or_path", None))


ENGINES: dict[str, Callable[..., Engine]] = {"hf": _hf, "vllm": _vllm}


def build_engine(settings, model, tokenizer) -> Engine:
    try:
        builder = ENGINES[settings.engine]
    except KeyError:
        raise ValueError(f"unknown engine {settings.engine!r}; known: {', '.join(ENGINES)}") from None
    return builder(settings, model, tokenizer)

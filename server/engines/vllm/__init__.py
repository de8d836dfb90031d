"""Generation in vLLM (``--engine vllm``); training stays on the hf model.

- ``options.py``: ``--vllm-option`` parsing, the vLLM import, LoRA rank choice (no vLLM needed);
- ``versions.py``: the adapter-version registry (lineages, refcounts, what to unload);
- ``engine.py``: ``VLLMEngine``, an in-process ``AsyncLLM``;
- ``remote.py``: ``RemoteVLLMEngine``, an external ``vllm serve``;
- ``install.py``: ``dynarank install-vllm``.

``build_vllm_engine`` is the one place that chooses between in-process and remote.
"""

from __future__ import annotations

import os
from pathlib import Path

from server.engines.vllm.options import parse_engine_options


def build_vllm_engine(settings, tokenizer, model_path=None, options: dict | None = None):
    """The engine ``--engine vllm`` asks for: in-process, or a remote ``vllm serve`` when ``url`` is set."""
    if options is None:
        raw = settings.engine_options
        options = raw if isinstance(raw, dict) else parse_engine_options(raw)
    options = dict(options)
    if model_path is None or not Path(model_path).is_dir():
        from server.models import resolve_model

        model_path = resolve_model(settings.model, progress=True)
    try:
        from adapter_core import AdapterConfig

        r_max = AdapterConfig().bounds.r_max
    except Exception:
        r_max = 64
    url = options.pop("url", None) or os.environ.get("DYNARANK_VLLM_URL")
    if url:
        from server.engines.vllm.remote import RemoteVLLMEngine

        return RemoteVLLMEngine(url, tokenizer, settings.served_name, model_path=model_path,
                                data_dir=options.pop("shared_dir", None) or settings.data_dir,
                                api_key=options.pop("api_key", None), r_max=r_max)
    from server.engines.vllm.engine import VLLMEngine

    options.pop("shared_dir", None)
    options.pop("api_key", None)
    return VLLMEngine(model_path, tokenizer, settings.served_name, data_dir=settings.data_dir, r_max=r_max,
                      **options)

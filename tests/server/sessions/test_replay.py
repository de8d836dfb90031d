"""The replay buffer: which rows a step trains on, the idle-step budget, documents at low weight, padding."""

from __future__ import annotations

import pytest
import torch

from adapter_core import AdapterConfig, new_adapter, train_step
from code_signals import TrainingExample
from server.adaptation.examples import example_batch, examples_batch
from server.sessions.replay import ReplayBuffer, ReplayConfig


def example(i: int, n: int = 6, weight: float = 1.0) -> TrainingExample:
    ids = [(i * 37 + k * 11) % 900 + 10 for k in range(n)]
    return TrainingExample(ids, [0.0, 0.0] + [1.0] * (n - 2), [0] * n, "new_code", f"f{i}.py", "python",
                           weight=weight)


def test_a_step_trains_on_the_new_example_and_the_most_recent_ones():
    buffer = ReplayBuffer(ReplayConfig(rows=2, size=3))
    assert buffer.batch_for(example(0)) == [example(0)]
    for i in range(5):
        buffer.learned(example(i))
    assert buffer.batch_for(example(9)) == [example(9), example(4), example(3)]
    assert len(buffer.recent) == 3  # bounded


def test_idle_steps_are_earned_by_new_examples_and_then_stop():
    buffer = ReplayBuffer(ReplayConfig(rows=1, idle_steps=2, document_weight=0.5))
    assert buffer.idle_batch() == []  # nothing learned yet
    buffer.add_documents([example(7)])
    buffer.learned(example(0))
    buffer.learned(example(1))
    batches = [buffer.idle_batch() for _ in range(6)]
    assert [len(b) for b in batches] == [3, 3, 3, 3, 0, 0]  # 2 steps per new example, then none
    doc = batches[0][-1]
    assert doc.input_ids == example(7).input_ids and doc.weight == 0.5


def test_documents_are_off_at_weight_zero_or_without_idle_steps():
    buffer = ReplayBuffer(ReplayConfig(document_weight=0, idle_steps=1))
    buffer.add_documents([example(1)])
    assert not buffer.documents and not buffer.wants_documents
    buffer = ReplayBuffer(ReplayConfig(document_weight=0.5, idle_steps=0))  # replayed in idle steps only
    buffer.add_documents([example(1)])
    assert not buffer.documents and not buffer.wants_documents
    buffer = ReplayBuffer(ReplayConfig(document_weight=0.5, idle_steps=1))
    buffer.add_documents([example(1)])
    assert len(buffer.documents) == 1


def test_padded_rows_lose_exactly_what_they_lose_alone(tiny_llama):
    adapter, _ = new_adapter(tiny_llama, AdapterConfig(rank_budget=None))
    short, long = example(1, n=5), example(2, n=12, weight=3.0)
    alone = [train_step(tiny_llama, adapter, example_batch(ex), lr=0.0).loss for ex in (short, long)]
    batch = examples_batch([short, long])
    assert batch["input_ids"].shape == (2, 12) and batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 7
    together = train_step(tiny_llama, adapter, batch, lr=0.0).loss
    assert together == pytest.approx((alone[0] + 3 * alone[1]) / 4, rel=1e-4)
    assert torch.equal(batch["example_weights"], torch.tensor([1.0, 3.0]))

"""Sessions learn in the format they are served, within a parameter budget, and resume where they were.

Real edits from the four histories beside the checkout (``shared/data``), the real
tokenizers, and the server's own example builder, config and train step.
"""

from __future__ import annotations

import gzip
import json

import pytest

from adapter_core import new_session_adapter
from server.adaptation.examples import EDIT_FIM_RATIO, edit_example_builder
from server.adaptation.learner import adapt_on_example
from server.config import Settings
from server.engines.base import GenerationRequest
from server.engines.decoding import encode_prompt
from server.sessions import SessionManager
from server.sessions.adapter_config import session_adapter_config
from server.store import AdapterStore
from tests.conftest import shared_data_dir


def real_edits(names=("click", "starlette"), per_history=40) -> list[dict]:
    data = shared_data_dir()
    if data is None:
        pytest.skip("shared/data (the edit histories) is not beside the checkout")
    edits = []
    for name in names:
        with gzip.open(data / f"{name}_edits.jsonl.gz", "rt") as f:
            edits += [json.loads(line) for _, line in zip(range(per_history), f)]
    return edits


def examples_of(tokenizer, edits, max_tokens=None):
    builder = edit_example_builder(tokenizer, **({"max_tokens": max_tokens} if max_tokens else {}))
    for edit in edits:
        for example in builder.from_edit(edit["before"], edit["after"], path=edit["path"]):
            yield edit["after"], example


def served_prompt(tokenizer, text, example) -> list[int]:
    """The engine's prompt for a completion request at the example's cursor, as the websocket sends it."""
    a, b = example.prefix_range
    suffix = text[slice(*example.suffix_range)] if example.suffix_range else None
    return encode_prompt(tokenizer, GenerationRequest(prompt=text[a:b], suffix=suffix, heal=True)).ids


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    from server.models import DEFAULT_MODEL, ensure_model

    return AutoTokenizer.from_pretrained(ensure_model(DEFAULT_MODEL, progress=False))


def test_edit_examples_are_the_engines_prompts_with_fim_at_the_documented_ratio(qwen_tokenizer):
    checked = fim = 0
    for text, example in examples_of(qwen_tokenizer, real_edits(("click", "starlette", "cobra", "zustand"), 10)):
        n_context = example.loss_weights.index(next(w for w in example.loss_weights if w > 0))
        assert example.input_ids[:n_context] == served_prompt(qwen_tokenizer, text, example)
        # The targets are the healed prompt tail and the edit, exactly as the model must generate them.
        assert qwen_tokenizer.decode(example.input_ids[n_context:]) == example.target_text
        assert example.target_start <= example.prefix_range[1]  # at most the healed token before the cursor
        checked += 1
        fim += example.fim
    assert checked >= 40
    # Nearly every edit has text after it, so the FIM share is close to the ratio.
    assert EDIT_FIM_RATIO - 0.2 < fim / checked < EDIT_FIM_RATIO + 0.1


def test_without_fim_tokens_examples_are_prefix_prompts(tokenizer):
    checked = 0
    for text, example in examples_of(tokenizer, real_edits(per_history=10)):
        assert not example.fim and example.suffix_range is None
        n_context = example.loss_weights.index(next(w for w in example.loss_weights if w > 0))
        assert example.input_ids[:n_context] == served_prompt(tokenizer, text, example)
        checked += 1
    assert checked >= 10


@pytest.mark.timeout(3600)  # 300 train steps: about a minute alone, much longer on a loaded machine
def test_dynamicrank_reallocates_within_the_budget_over_300_steps_of_real_edits(tokenizer, tiny_llama):
    config = session_adapter_config(Settings(model="tiny"), policy="dynamicrank")
    adapter, policy = new_session_adapter(tiny_llama, config)
    budget = policy.bounds.budget
    assert budget == 8 * sum(m.params_per_rank() for m in adapter.modules.values())
    # Shorter examples than the server's 256 tokens keep 300 steps quick; the mechanism is the same.
    examples = [ex for _, ex in examples_of(tokenizer, real_edits(per_history=60), max_tokens=64)]
    assert len(examples) >= 60
    went_up, went_down = set(), set()
    for step in range(300):
        before = adapter.ranks
        stats, _ = adapt_on_example(tiny_llama, adapter, policy, examples[step % len(examples)])
        assert adapter.num_params <= budget, f"step {step}: {adapter.num_params} > {budget}"
        went_up |= {n for n, r in adapter.ranks.items() if r > before[n]}
        went_down |= {n for n, r in adapter.ranks.items() if r < before[n]}
    assert went_up and went_down, (went_up, went_down)
    assert adapter.step == 300


def test_step_counter_and_policy_state_survive_persist_and_restore(tmp_path, tokenizer, tiny_llama):
    def manager():
        settings = Settings(model="tiny", data_dir=tmp_path, rank_policy="dynamicrank")
        return SessionManager(settings, tiny_llama, tokenizer, AdapterStore(tmp_path, "tiny", 3))

    first = manager()
    session, token = first.attach("key", "s1")
    for _, example in list(examples_of(tokenizer, real_edits(per_history=3)))[:4]:
        _, snap = adapt_on_example(tiny_llama, session.adapter, session.policy, example)
        session.publish(snap, 0.0)
    first.persist(session, force=True)

    restored, _ = manager().attach("key", resume_token=token)
    assert restored.adapter.step == session.adapter.step == 4
    assert restored.adapter.ranks == session.adapter.ranks
    assert restored.policy.state_dict()["base"] == session.policy.state_dict()["base"]
    # Step-indexed schedules go on where they were (the Hessian is estimated every 10 steps).
    assert [restored.policy.hessian_due(s) for s in range(4, 12)] == [session.policy.hessian_due(s) for s in range(4, 12)]

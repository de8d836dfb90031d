"""One session train step on one example, shared by the adaptation workers and the bench.

With ``server.sessions.adapter_config.session_adapter_config`` (the config) and
``adapter_core.new_session_adapter`` (the construction) it is the whole of a
session's learner, so the bench's replay measures exactly what the server does.
"""

from __future__ import annotations

from adapter_core import AdapterSnapshot, StepStats, train_step
from server.adaptation.examples import examples_batch
from server.sessions.replay import ReplayBuffer


def adapt_on_example(model, adapter, policy, example, replay: ReplayBuffer | None = None
                     ) -> tuple[StepStats, AdapterSnapshot | None]:
    """One train step on one ``TrainingExample`` (beside the replay buffer's recent ones);
    publishes a new version unless the step was skipped.

    A skipped step (non-finite loss or gradient) left the factors untouched, so there is
    nothing new to publish and the snapshot is None.
    """
    rows = replay.batch_for(example) if replay is not None else [example]
    stats, snap = _step(model, adapter, policy, rows)
    if replay is not None and snap is not None:
        replay.learned(example)
    return stats, snap


def idle_step(model, adapter, policy, replay: ReplayBuffer) -> tuple[StepStats | None, AdapterSnapshot | None]:
    """One step on the replay buffer while nothing else waits; (None, None) once the idle steps
    earned by new examples are spent (the stop rule: see server.sessions.replay)."""
    rows = replay.idle_batch()
    if not rows:
        return None, None
    return _step(model, adapter, policy, rows)


def _step(model, adapter, policy, rows) -> tuple[StepStats, AdapterSnapshot | None]:
    stats = train_step(model, adapter, examples_batch(rows, adapter.device), policy)
    if stats.skipped:
        return stats, None
    return stats, adapter.snapshot(loss=stats.loss)

"""One session train step on one example, shared by the adaptation workers and the bench.

With ``server.sessions.adapter_config.session_adapter_config`` (the config) and
``adapter_core.new_session_adapter`` (the construction) it is the whole of a
session's learner, so the bench's replay measures exactly what the server does.
"""

from __future__ import annotations

from adapter_core import AdapterSnapshot, StepStats, train_step
from server.adaptation.examples import example_batch


def adapt_on_example(model, adapter, policy, example) -> tuple[StepStats, AdapterSnapshot | None]:
    """One train step on one ``TrainingExample``; publishes a new version unless the step was skipped.

    A skipped step (non-finite loss or gradient) left the factors untouched, so there is
    nothing new to publish and the snapshot is None.
    """
    stats = train_step(model, adapter, example_batch(example), policy)
    if stats.skipped:
        return stats, None
    return stats, adapter.snapshot(loss=stats.loss)

"""The ``AdapterConfig`` a session's adapter is built from, defined once.

Sessions, fine-tuning jobs and the replay benchmark all start from it, so a change
of the server's policy or learning rate reaches all three.
"""

from __future__ import annotations

from adapter_core import AdapterConfig


def session_adapter_config(settings, policy: str | None = None, **overrides) -> AdapterConfig:
    """``settings.rank_policy`` (or ``policy``) at ``settings.adapter_lr`` within ``settings.rank_budget``.

    ``overrides`` are further ``AdapterConfig`` fields (``lr`` included), for jobs and the bench.
    """
    fields = {"lr": settings.adapter_lr, "rank_budget": settings.rank_budget or None, **overrides}
    return AdapterConfig(policy=policy or settings.rank_policy, **fields)

"""What the request handlers share: one ServerState per app (``app.state.dynarank``)."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from server.config import Settings


class AdapterResolver(Protocol):
    """Maps a `model` name from a request to an adapter snapshot the caller may use."""

    def resolve(self, model_name: str, api_key: str | None):
        """Return (snapshot or None for the base model, adapter_id or None).

        Raises KeyError if the name is neither the base model nor an adapter
        this key may use (the API turns it into a 404 ``model_not_found``).
        """
        ...

    def list_for(self, api_key: str | None) -> list[dict]:
        """Adapters this key may use, as OpenAI model objects (``id``, ``owned_by``, ``parent``)."""
        ...


@dataclasses.dataclass
class ServerState:
    settings: Settings
    engine: Any  # server.engines.base.Engine
    tokenizer: Any
    model: Any  # the frozen base model (shared by serving and training)
    adapters: AdapterResolver | None = None  # set by the session layer
    metrics: Any = None
    extras: dict = dataclasses.field(default_factory=dict)

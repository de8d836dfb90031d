"""Server settings: one dataclass filled from the command line (and environment)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from server.models import DEFAULT_MODEL, dynarank_home


@dataclasses.dataclass
class Settings:
    model: str = DEFAULT_MODEL  # embedded model name or a local model directory
    engine: str = "hf"
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = dataclasses.field(default_factory=lambda: dynarank_home() / "data")
    api_keys: tuple[str, ...] = ()  # empty: no auth, local-only bind
    rank_policy: str = "dynamicrank"
    max_sessions: int = 64
    max_queue_per_session: int = 32
    max_request_bytes: int = 4 * 1024 * 1024
    max_tokens_limit: int = 512
    cors_origins: tuple[str, ...] = ()
    log_level: str = "info"

    @property
    def served_name(self) -> str:
        """The name clients use for the base model."""
        return Path(self.model).name if os.sep in self.model else self.model

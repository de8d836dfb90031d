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
    engine_options: tuple[str, ...] = ()  # KEY=VALUE options for the vllm engine (--vllm-option)
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
    max_inflight_requests: int = 32  # completion requests in flight before 429
    log_level: str = "info"
    # -- sessions and adaptation (server/sessions/, server/adaptation/) --
    adapter_lr: float = 1e-3
    adaptation_workers: int = 1  # background training threads
    train_threads: int = 1  # torch intra-op threads per training thread on CPU (serving keeps the rest)
    persist_every: int = 4  # write a session's adapter every K published versions (and on shutdown/evict)
    keep_versions: int = 3  # versions kept per adapter in the store
    edit_quiet_s: float = 0.75  # an edit burst settles after this much quiet
    max_ws_message_bytes: int = 1024 * 1024
    # -- completion feedback (server/feedback/) --
    feedback_training: bool = True  # accepted completions kept in the document become training examples
    feedback_weight: float = 3.0  # loss weight multiplier of those examples (edits have 1)
    feedback_check_s: float = 2.0  # how long after acceptance the text must still be in the document
    feedback_max_records: int = 256  # completions remembered per session/model for validating feedback
    repo_roots: tuple[str, ...] = ()  # fine-tune jobs may read repositories only under these (empty: any, if no API keys)

    @property
    def served_name(self) -> str:
        """The name clients use for the base model."""
        return Path(self.model).name if os.sep in self.model else self.model

"""Server settings: one validated model filled from keyword arguments, the environment and defaults.

Every field is read from ``DYNARANK_<FIELD>`` (``DYNARANK_PORT=9000``,
``DYNARANK_API_KEYS=a,b``); tuple fields take comma-separated values there.
``dynarank serve`` adds one flag per field (``--field-name``, see server/cli.py),
so the order of precedence is: keyword argument (CLI flag) > environment > default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from server.devices import DEVICE_SYNTAX, DtypeName, check_device_text, check_int8_device, resolve_device
from server.models import DEFAULT_MODEL, EMBEDDED_MODELS, dynarank_home

# The names in server.engines.ENGINES (a higher layer, so not imported here;
# tests/server/test_cli.py checks they agree).
EngineName = Literal["hf", "vllm"]
ENGINE_NAMES: tuple[str, ...] = get_args(EngineName)
LogLevel = Literal["critical", "error", "warning", "info", "debug", "trace"]  # uvicorn's levels
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)

# A tuple of strings given as a comma-separated string in the environment (not JSON).
StrTuple = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    """Everything ``dynarank serve`` can be told; the app receives one instance explicitly."""

    # Unknown keyword arguments are an error; the environment source reads only
    # ``DYNARANK_<field>`` for declared fields, so other variables such as
    # DYNARANK_HOME (read by server/models.py) are never taken for settings.
    model_config = SettingsConfigDict(
        env_prefix="DYNARANK_",
        extra="forbid",
        validate_assignment=True,
        validate_default=True,
    )

    # -- model and engine --
    model: str = Field(DEFAULT_MODEL, min_length=1,
                       description=f"embedded model name ({', '.join(EMBEDDED_MODELS)}) or a local model directory")
    engine: EngineName = Field("hf", description="generation engine")
    device: str = Field("auto", description=f"where the model runs and adapters train: {DEVICE_SYNTAX} "
                                            "(auto: cuda when a CUDA device is visible, else cpu)")
    dtype: DtypeName = Field("auto", description="precision of the model's weights (LoRA factors stay float32); "
                                                 "int8 (CPU only): float32 weights plus int8 copies that decode steps "
                                                 "read; auto: bfloat16 on cuda, int8 on the CPU (measured fastest there)")
    engine_options: StrTuple = Field(
        (), description="vLLM engine option KEY=VALUE (repeatable): max_loras, max_cpu_loras, max_lora_rank, "
                        "max_model_len, max_num_seqs, kv_cache_gib, dtype, gpu_memory_utilization; url=http://... "
                        "for an external `vllm serve` (with api_key, shared_dir); see docs/vllm.md")
    # -- HTTP --
    host: str = Field("127.0.0.1", min_length=1,
                      description="address to listen on (without API keys the server binds to 127.0.0.1 only)")
    port: int = Field(8000, ge=1, le=65535, description="port to listen on")
    data_dir: Path = Field(default_factory=lambda: dynarank_home() / "data",
                           description="sessions, adapters and fine-tuning jobs (default $DYNARANK_HOME/data)")
    api_keys: StrTuple = Field((), description="accepted API keys (repeatable); none: no auth, local-only bind")
    cors_origins: StrTuple = Field((), description="allow this browser origin (repeatable)")
    allowed_origins: StrTuple = Field((), description="browser origin (scheme://host[:port]) allowed to call the "
                                                      "server besides loopback ones (repeatable; `*`: any); checked "
                                                      "on HTTP without API keys and on the websocket always")
    allowed_hosts: StrTuple = Field((), description="Host header name served without API keys besides localhost, "
                                                    "127.0.0.1, [::1] and --host (repeatable)")
    max_request_bytes: int = Field(4 * 1024 * 1024, ge=1, description="413 above this request body size")
    max_tokens_limit: int = Field(512, ge=1, description="largest max_tokens a completion request may ask for")
    editor_prompt_tokens: int | None = Field(None, ge=0, description="tokens of document text around the cursor "
                                                                    "that a websocket completion's prompt keeps "
                                                                    "(about 3/4 before the cursor, 1/4 after); "
                                                                    "default: 1024 when the model runs on the CPU, "
                                                                    "where prefill is most of a completion's time "
                                                                    "(docs/bench_context.md), none on cuda; 0: none "
                                                                    "(the model's context still bounds it)")
    max_inflight_requests: int = Field(32, ge=1, description="completion requests in flight before 429")
    max_ws_inflight_per_connection: int = Field(4, ge=1, description="websocket completions one connection may "
                                                                     "have in flight (beyond it: too_many_requests)")
    max_ws_connections_per_key: int = Field(32, ge=1, description="websocket sessions one API key (without keys: "
                                                                 "all local clients) may have open at once (beyond "
                                                                 "it: hello is refused with too_many_connections)")
    max_ws_message_bytes: int = Field(1024 * 1024, ge=1, description="largest websocket message accepted (up to "
                                                                     "twice that gets an error reply; larger closes "
                                                                     "the socket with code 1009)")
    read_timeout_s: float = Field(30.0, gt=0, allow_inf_nan=False,
                                  description="seconds a client has to send a whole HTTP request, headers and body, "
                                              "from its first byte (or from connecting); then the connection is "
                                              "closed")
    max_edit_changes: int = Field(256, ge=1, description="range changes one websocket edit may carry (beyond it: "
                                                         "too_many_changes; send the full text instead)")
    max_document_chars: int = Field(1024 * 1024, ge=1, description="largest document a session mirrors, in characters, "
                                                                   "after an open or an edit (beyond it: "
                                                                   "document_too_large)")
    max_open_documents: int = Field(64, ge=1, description="documents open at once per session, all its tabs together "
                                                          "(beyond it: too_many_documents)")
    log_level: LogLevel = Field("info", description="uvicorn log level")
    # -- sessions and adaptation (server/sessions/, server/adaptation/) --
    # fixed r=8 beat dynamicrank on 3 of 4 histories at the same parameters (docs/bench_replay.md)
    rank_policy: str = Field("fixed", min_length=1, description="rank policy of session adapters")
    rank_budget: float = Field(8.0, ge=0, allow_inf_nan=False,
                               description="LoRA parameters per session, as a mean rank: the parameters a fixed "
                                           "adapter of this rank has on the same modules (0: no cap)")
    max_sessions: int = Field(64, ge=1, description="sessions kept in memory (beyond it, idle sessions are saved "
                                                     "and evicted, least recently used first; when all are "
                                                     "connected, a new one is refused with too_many_sessions)")
    max_queue_per_session: int = Field(32, ge=1, description="training examples queued per session (the oldest drop "
                                                              "when it is full)")
    adapter_lr: float = Field(5e-4, gt=0, lt=1, allow_inf_nan=False, description="learning rate of session adapters")
    replay_rows: int = Field(0, ge=0, le=16, description="recent examples trained again beside each new one "
                                                        "(one row each; 0: off)")
    replay_size: int = Field(16, ge=1, le=256, description="examples a session's replay buffer keeps")
    idle_steps: int = Field(0, ge=0, le=16, description="steps on the replay buffer that each new example earns, "
                                                        "taken while no completion runs (0: no idle training)")
    document_weight: float = Field(0.25, ge=0, le=1, allow_inf_nan=False,
                                   description="example weight of chunks of newly opened documents, replayed in "
                                               "idle steps (0: documents are not trained on; needs --idle-steps)")
    adaptation_workers: int = Field(1, ge=1, description="background training threads")
    train_threads: int = Field(1, ge=0, description="torch intra-op threads per training thread on CPU "
                                                    "(serving keeps the rest; 0: leave torch's setting)")
    persist_every: int = Field(4, ge=1, description="write a session's adapter to disk every N published "
                                                        "versions (and on shutdown or eviction; a session that "
                                                        "never trained is not written)")
    persist_interval_s: float = Field(5.0, ge=0, allow_inf_nan=False,
                                      description="also write a session's latest adapter version and open "
                                                  "documents at most this many seconds after they change "
                                                  "(0: only every --persist-every versions)")
    keep_versions: int = Field(3, ge=1, description="versions kept per adapter in the store")
    session_retention_days: float = Field(30.0, ge=0, allow_inf_nan=False,
                                          description="delete stored sessions not used for this many days "
                                                      "(0: keep them however old)")
    max_stored_sessions_mb: float = Field(4096.0, ge=0, allow_inf_nan=False,
                                          description="disk space stored sessions may take, in MB; beyond it the "
                                                      "least recently used ones that are not in memory are "
                                                      "deleted (0: no cap)")
    edit_quiet_s: float = Field(0.75, ge=0, allow_inf_nan=False,
                                description="seconds of quiet after which a burst of edits becomes training examples")
    # -- completion feedback (server/feedback/) --
    feedback_training: bool = Field(True, description="train on accepted completions the user kept "
                                                      "(off: count feedback only)")
    feedback_weight: float = Field(3.0, gt=0, allow_inf_nan=False,
                                   description="loss weight of examples built from accepted completions (edits have 1)")
    feedback_check_s: float = Field(2.0, ge=0, allow_inf_nan=False,
                                    description="seconds after acceptance at which the accepted text must still be "
                                                "in the document")
    feedback_max_records: int = Field(256, ge=1, description="completions remembered per session and model "
                                                             "for validating feedback")
    repo_roots: StrTuple = Field((), description="fine-tuning jobs may read server-side repositories only under "
                                                 "these directories (repeatable; none: any, if no API keys)")
    max_jobs: int = Field(16, ge=1, description="fine-tuning jobs validating, queued or running at once, all keys "
                                                "together (beyond it: 429)")
    max_jobs_per_key: int = Field(4, ge=1, description="fine-tuning jobs validating, queued or running at once per "
                                                       "API key (beyond it: 429)")
    max_finished_jobs_per_key: int = Field(20, ge=1, description="finished fine-tuning jobs kept per API key; older "
                                                                 "ones are forgotten, oldest finished first (the "
                                                                 "adapters they made stay)")

    @field_validator("engine_options", "api_keys", "cors_origins", "repo_roots", "allowed_origins", "allowed_hosts",
                     mode="before")
    @classmethod
    def _split_commas(cls, value):
        """``"a, b"`` (environment) -> ``("a", "b")``; lists and tuples drop blank items."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, dict):  # engine options given as a mapping
            value = [f"{k}={v}" for k, v in value.items()]
        if isinstance(value, (list, tuple)):
            items = (item.strip() if isinstance(item, str) else item for item in value)
            return tuple(item for item in items if item != "")
        return value

    @field_validator("engine_options")
    @classmethod
    def _key_value(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Keys and values are checked by the vllm engine (server/engines/vllm/), which owns them.
        bad = [item for item in value if "=" not in item or not item.partition("=")[0].strip()]
        if bad:
            raise ValueError(f"expected KEY=VALUE, got {', '.join(map(repr, bad))}")
        return value

    @field_validator("allowed_origins", "allowed_hosts")
    @classmethod
    def _origins_lower(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        # Origins and host names compare case-insensitively; an origin has no path (not even "/").
        return tuple(item.lower().rstrip("/") for item in value)

    @field_validator("repo_roots")
    @classmethod
    def _absolute(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(str(Path(root).expanduser().resolve()) for root in value)

    @field_validator("device")
    @classmethod
    def _device_present(cls, value: str) -> str:
        # Checked here so that an absent device stops `dynarank serve` at once, naming the flag or variable.
        value = check_device_text(value)
        if value.startswith("cuda"):
            resolve_device(value)
        return value

    @field_validator("dtype")
    @classmethod
    def _int8_on_the_cpu(cls, value: str, info: ValidationInfo) -> str:
        check_int8_device(value, str(info.data.get("device", "")))
        return value

    @field_validator("engine", "log_level", "dtype", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("rank_policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        known = _rank_policy_names()
        if known and value not in known:
            raise ValueError(f"unknown rank policy {value!r}; known: {', '.join(sorted(known))}")
        return value

    @property
    def served_name(self) -> str:
        """The name clients use for the base model."""
        return Path(self.model).name if os.sep in self.model else self.model


def _rank_policy_names() -> set[str]:
    """Names in adapter_core's policy registry (imported lazily: it brings torch; importing it registers
    the built-in policies)."""
    from adapter_core.policies import POLICIES

    return set(POLICIES)

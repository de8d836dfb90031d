"""The replay's methods: a learner per method that adapts on examples and publishes snapshots.

Every adapting method except ``adalora`` uses the server's path: the session
``AdapterConfig`` (``server.sessions.adapter_config.session_adapter_config``: policy, server
learning rate), ``adapter_core.new_session_adapter`` and the session train step
``server.adaptation.learner.adapt_on_example``. ``adalora`` is the
real PEFT AdaLoRA on a copy of the model (its own train step), converted to plain
LoRA factors for evaluation on the shared model.
"""

from __future__ import annotations

import copy
import time

# name -> (policy, AdapterConfig keyword arguments, policy options)
METHODS: dict[str, tuple[str | None, dict, dict]] = {
    "base": (None, {}, {}),
    # Other fixed ranks carry a budget of their own (the session default is what rank 8 uses).
    "fixed4": ("fixed", {"r_init": 4, "rank_budget": 4}, {}),
    "fixed8": ("fixed", {"r_init": 8}, {}),
    "fixed16": ("fixed", {"r_init": 16, "rank_budget": 16}, {}),
    "fixed32": ("fixed", {"r_init": 32, "rank_budget": 32}, {}),
    "fixed64": ("fixed", {"r_init": 64, "rank_budget": 64}, {}),
    "adalora": ("peft-adalora", {}, {}),
    "adalora-emu": ("adalora", {}, {}),
    "lalora": ("lalora", {}, {}),
    "gard": ("gard", {}, {}),
    "dynamicrank": ("dynamicrank", {}, {}),
    "dynamicrank-no-importance": ("dynamicrank", {}, {"use_token_importance": False}),
    "dynamicrank-no-landscape": ("dynamicrank", {}, {"use_loss_landscape": False}),
}
DEFAULT_METHODS = ("base", "fixed8", "fixed32", "fixed64", "adalora", "lalora", "gard", "dynamicrank",
                   "dynamicrank-no-importance", "dynamicrank-no-landscape")


class BaseLearner:
    """No adaptation: evaluates the frozen base model."""

    def __init__(self):
        self.step_times: list[float] = []

    def snapshot(self):
        return None

    def adapt(self, example, steps: int) -> list[float]:
        return []

    def open_document(self, examples) -> None:
        """A document was opened: its examples join the replay buffer (sessions only)."""

    def pause(self) -> list[float]:
        """The user pauses after an edit: the idle steps the server would take (sessions only)."""
        return []

    @property
    def num_params(self) -> int:
        return 0

    def ranks(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        pass


class SessionLearner(BaseLearner):
    """One server session's adapter: the server's config, construction, replay buffer, step and idle
    steps (``server.adaptation.learner``, ``server.sessions.replay``)."""

    def __init__(self, model, policy: str, config_kw: dict, policy_options: dict, seed: int, total_steps: int,
                 settings=None):
        from adapter_core import new_session_adapter
        from server.config import Settings
        from server.sessions.adapter_config import session_adapter_config
        from server.sessions.replay import ReplayBuffer, ReplayConfig

        super().__init__()
        settings = settings or Settings()
        options = dict(policy_options)
        if policy == "adalora":
            options.setdefault("total_step", max(1, total_steps))
        config = session_adapter_config(settings, policy, seed=seed, policy_options=options, **config_kw)
        self.model = model
        self.adapter, self.policy = new_session_adapter(model, config)  # sessions start with task=None
        self.replay = ReplayBuffer(ReplayConfig.from_settings(settings))
        self._snap = self.adapter.snapshot(bump=False)

    def open_document(self, examples) -> None:
        self.replay.add_documents(examples)

    def pause(self) -> list[float]:
        from server.adaptation.learner import idle_step

        losses = []
        while True:
            t0 = time.perf_counter()
            stats, snap = idle_step(self.model, self.adapter, self.policy, self.replay)
            if stats is None:
                return losses
            self.step_times.append(time.perf_counter() - t0)
            if snap is not None:
                losses.append(stats.loss)
                self._snap = snap

    def snapshot(self):
        return self._snap

    def adapt(self, example, steps: int) -> list[float]:
        from server.adaptation.learner import adapt_on_example

        losses = []
        for _ in range(steps):
            t0 = time.perf_counter()
            stats, snap = adapt_on_example(self.model, self.adapter, self.policy, example, self.replay)
            self.step_times.append(time.perf_counter() - t0)
            if snap is not None:
                losses.append(stats.loss)
                self._snap = snap
        return losses

    @property
    def num_params(self) -> int:
        return self._snap.num_params

    def ranks(self) -> dict[str, int]:
        return dict(self._snap.ranks)


class PeftAdaLoraLearner(BaseLearner):
    """PEFT AdaLoRA on a private copy of the model; trained on the changed tokens only."""

    def __init__(self, model, seed: int, total_steps: int, lr: float):
        import torch

        from adapter_core import DEFAULT_TARGET_MODULES
        from adapter_core.adalora import make_adalora_model

        super().__init__()
        torch.manual_seed(seed)
        self.peft_model = make_adalora_model(copy.deepcopy(model), list(DEFAULT_TARGET_MODULES),
                                             total_step=max(2, total_steps))
        self.optimizer = torch.optim.AdamW([p for p in self.peft_model.parameters() if p.requires_grad], lr=lr)
        self.step = 0
        self._snap = self._convert()

    def _convert(self):
        import torch

        from adapter_core import AdapterSnapshot
        from adapter_core.adalora import adalora_to_lora

        factors = adalora_to_lora(self.peft_model)
        # Pruning can leave a module at rank 0; our layers want r >= 1, so it keeps one zero direction.
        A, B = {}, {}
        for name, (a, b) in factors.items():
            if a.shape[0] == 0:
                a, b = torch.zeros(1, a.shape[1]), torch.zeros(b.shape[0], 1)
            A[name], B[name] = a, b
        live = sum(int(f[0].shape[0]) * (f[0].shape[1] + f[1].shape[0]) for f in factors.values())
        snap = AdapterSnapshot.from_tensors(self.step, A, B, 1.0, {"policy": "peft-adalora"})
        self._live_params = live
        return snap

    def snapshot(self):
        return self._snap

    def adapt(self, example, steps: int) -> list[float]:
        import torch

        from adapter_core.adalora import adalora_train_step

        ids = torch.tensor([list(example.input_ids)], dtype=torch.long)
        weights = torch.tensor([list(example.loss_weights)])
        labels = ids.masked_fill(weights <= 0, -100)  # the changed tokens, like our weighted loss
        losses = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(adalora_train_step(self.peft_model, {"input_ids": ids, "labels": labels},
                                             self.optimizer, self.step))
            self.step += 1
            self.step_times.append(time.perf_counter() - t0)
        self._snap = self._convert()
        return losses

    @property
    def num_params(self) -> int:
        return self._live_params

    def ranks(self) -> dict[str, int]:
        return dict(self._snap.ranks)

    def close(self) -> None:
        del self.peft_model, self.optimizer


def make_learner(name: str, model, seed: int = 0, total_steps: int = 100, settings=None) -> BaseLearner:
    """``settings``: the server Settings whose session options (learning rate, budget, replay) apply."""
    import torch

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    policy, config_kw, options = METHODS[name]
    torch.manual_seed(seed)
    if policy is None:
        return BaseLearner()
    if policy == "peft-adalora":
        from server.config import Settings

        return PeftAdaLoraLearner(model, seed, total_steps, (settings or Settings()).adapter_lr)
    return SessionLearner(model, policy, config_kw, options, seed, total_steps, settings)

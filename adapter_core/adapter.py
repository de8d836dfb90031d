"""``Adapter``: the trainable state of one adapter (factors + optimizer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from adapter_core.policies.base import ModuleInfo
from adapter_core.resize import resize_factors
from adapter_core.snapshot import AdapterSnapshot


class Adapter:
    """LoRA factors as ``nn.Parameter`` per module, a scale per module and an AdamW optimizer.

    Bind it with ``use_adapter(model, adapter)`` to train; publish with
    :meth:`snapshot`. Only the thread that trains should touch it.

    Optimizer state across a resize: the moments of a resized module's A and B are
    reset (the next step starts them fresh, with Adam's bias correction). A
    rotation could carry the first moment over, but Adam's second moment is
    element-wise and has no meaningful image under a rotation; resetting is
    exact about what it does. Modules whose rank did not change keep their moments.
    """

    def __init__(
        self,
        modules: dict[str, ModuleInfo],
        A: dict[str, torch.Tensor],
        B: dict[str, torch.Tensor],
        scale: dict[str, float],
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        version: int = 0,
        seed: int = 0,
        metadata: dict | None = None,
    ):
        self.modules = {name: modules[name] for name in A}
        self.A = {n: nn.Parameter(t.detach().clone().float()) for n, t in A.items()}
        self.B = {n: nn.Parameter(t.detach().clone().float()) for n, t in B.items()}
        self.scale = {n: float(scale[n]) for n in A}
        self.version = version
        self.step = 0
        self.metadata = dict(metadata or {})
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)

    # -- construction ------------------------------------------------------------

    @classmethod
    def new(cls, modules: dict[str, ModuleInfo], ranks: dict[str, int], *, scale: float = 2.0, seed: int = 0, **kw):
        """Fresh adapter: A as PEFT initialises it (kaiming-uniform), B zero, so it starts as the base model."""
        gen = torch.Generator().manual_seed(seed)
        A, B = {}, {}
        for name, r in ranks.items():
            info = modules[name]
            bound = 1 / math.sqrt(info.in_features)
            A[name] = (torch.rand(r, info.in_features, generator=gen) * 2 - 1) * bound
            B[name] = torch.zeros(info.out_features, r)
        return cls(modules, A, B, {n: scale for n in ranks}, seed=seed, **kw)

    @classmethod
    def from_snapshot(cls, snap: AdapterSnapshot, modules: dict[str, ModuleInfo] | None = None, **kw) -> "Adapter":
        """Resume training from a published snapshot (fresh optimizer state, same version)."""
        if modules is None:
            modules = {
                n: ModuleInfo(n, a.shape[1], snap.B[n].shape[0], -1) for n, a in snap.A.items()
            }
        kw.setdefault("version", snap.version)
        kw.setdefault("metadata", dict(snap.metadata))
        return cls(modules, dict(snap.A), dict(snap.B), dict(snap.scale), **kw)

    # -- reading -----------------------------------------------------------------

    def lora_factors(self, name: str):
        a = self.A.get(name)
        return None if a is None else (a, self.B[name], self.scale[name])

    def parameters(self) -> list[nn.Parameter]:
        return [p for n in self.A for p in (self.A[n], self.B[n])]

    @property
    def ranks(self) -> dict[str, int]:
        return {n: int(a.shape[0]) for n, a in self.A.items()}

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = value

    def snapshot(self, *, bump: bool = True, **metadata) -> AdapterSnapshot:
        """Publish the current factors as an immutable snapshot.

        ``bump=True`` (after a train step): a new version, ``version + 1``. ``bump=False``:
        the current version, for the first publication of a new or resumed adapter, whose
        factors that version already names.
        """
        if bump:
            self.version += 1
        meta = {**self.metadata, **metadata, "step": self.step}
        return AdapterSnapshot.from_tensors(self.version, self.A, self.B, self.scale, meta)

    # -- changing ----------------------------------------------------------------

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def resize(self, new_ranks: dict[str, int]) -> list[str]:
        """Reshape the modules whose rank changes (SVD, eqs. 13-15); reset their moments.

        The Parameter objects stay the same (the optimizer keeps referring to
        them); only their data and optimizer state change. Returns the names resized.
        """
        changed = []
        with torch.no_grad():
            for name, r in new_ranks.items():
                if name not in self.A or r == self.A[name].shape[0]:
                    continue
                a, b = resize_factors(self.A[name], self.B[name], r, generator=self.generator)
                for p, data in ((self.A[name], a), (self.B[name], b)):
                    p.data = data
                    p.grad = None
                    self.optimizer.state.pop(p, None)
                changed.append(name)
        return changed

    def load_from(self, snap: AdapterSnapshot) -> None:
        """Roll the factors back to ``snap`` (same modules); optimizer moments are reset."""
        with torch.no_grad():
            for name in self.A:
                for p, src in ((self.A[name], snap.A[name]), (self.B[name], snap.B[name])):
                    p.data = src.detach().clone().to(p.dtype)
                    p.grad = None
                    self.optimizer.state.pop(p, None)

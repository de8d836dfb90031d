"""``Adapter``: the trainable state of one adapter (factors + optimizer)."""

from __future__ import annotations

import math

import torch
from torch import nn

from adapter_core.policies.base import ModuleInfo
from adapter_core.resize import grow_factors, resize_factors
from adapter_core.snapshot import AdapterSnapshot

# LoRA factors (and so their grads and AdamW moments) stay float32 on a lower-precision base:
# bfloat16 moments and small updates would round away.
FACTOR_DTYPE = torch.float32

# rsLoRA (Kalajdzievski 2023): scale = lora_alpha / sqrt(r), so a larger rank does not
# mean a larger update. This alpha gives 2.0 at r = 8, the constant scale used before.
RS_ALPHA = 2.0 * math.sqrt(8)


def rank_scale(lora_alpha: float, rank: int) -> float:
    return lora_alpha / math.sqrt(rank)


def _padded_state(state: dict, shape: torch.Size, dim: int, extra: int) -> dict:
    """AdamW state of a parameter that grew by ``extra`` along ``dim``: moments padded with zeros."""
    padded = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == shape:
            pad_shape = list(shape)
            pad_shape[dim] = extra
            value = torch.cat([value, value.new_zeros(pad_shape)], dim=dim)
        padded[key] = value
    return padded


class Adapter:
    """LoRA factors as ``nn.Parameter`` per module, a scale per module and an AdamW optimizer.

    Bind it with ``use_adapter(model, adapter)`` to train; publish with
    :meth:`snapshot`. Only the thread that trains should touch it. The factors live on
    ``device`` (the model's; default: where the given tensors are) in ``FACTOR_DTYPE``, so
    gradients, optimizer state and snapshots do too; the resize generator stays on the CPU.

    Optimizer state across a resize: growing appends directions (``grow_factors``) and
    keeps the module's AdamW moments, with zeros for the new entries. Shrinking
    truncates in the SVD basis, a rotation: Adam's second moment is element-wise and
    has no meaningful image under it, so only the module that shrank starts its
    moments afresh. Modules whose rank did not change are untouched.
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
        device: torch.device | str | None = None,
    ):
        def factor(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().to(device=device or t.device, dtype=FACTOR_DTYPE, copy=True))

        self.modules = {name: modules[name] for name in A}
        self.A = {n: factor(t) for n, t in A.items()}
        self.B = {n: factor(t) for n, t in B.items()}
        self.scale = {n: float(scale[n]) for n in A}
        self.version = version
        self.step = 0
        self.metadata = dict(metadata or {})
        self.generator = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=weight_decay)

    # -- construction ------------------------------------------------------------

    @classmethod
    def new(cls, modules: dict[str, ModuleInfo], ranks: dict[str, int], *, lora_alpha: float = RS_ALPHA,
            seed: int = 0, **kw):
        """Fresh adapter: A as PEFT initialises it (kaiming-uniform), B zero, so it starts as the base model.

        Each module's scale is rsLoRA's ``lora_alpha / sqrt(r)`` at its initial rank. A is drawn on
        the CPU (the same factors on every device for a seed) and moved to ``device`` (keyword).
        """
        gen = torch.Generator().manual_seed(seed)
        A, B = {}, {}
        for name, r in ranks.items():
            info = modules[name]
            bound = 1 / math.sqrt(info.in_features)
            A[name] = (torch.rand(r, info.in_features, generator=gen) * 2 - 1) * bound
            B[name] = torch.zeros(info.out_features, r)
        return cls(modules, A, B, {n: rank_scale(lora_alpha, r) for n, r in ranks.items()}, seed=seed, **kw)

    @classmethod
    def from_snapshot(cls, snap: AdapterSnapshot, modules: dict[str, ModuleInfo] | None = None, **kw) -> "Adapter":
        """Resume training from a published snapshot: same version and step (so step-indexed
        schedules go on where they were), fresh optimizer state."""
        if modules is None:
            modules = {
                n: ModuleInfo(n, a.shape[1], snap.B[n].shape[0], -1) for n, a in snap.A.items()
            }
        kw.setdefault("version", snap.version)
        kw.setdefault("metadata", dict(snap.metadata))
        adapter = cls(modules, dict(snap.A), dict(snap.B), dict(snap.scale), **kw)
        adapter.step = int(snap.metadata.get("step", 0))
        return adapter

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
    def device(self) -> torch.device:
        return next(iter(self.A.values())).device

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
        """Reshape the modules whose rank changes: grow by appending, shrink by SVD (eqs. 13-15).

        The Parameter objects stay the same (the optimizer keeps referring to
        them); only their data and optimizer state change. Returns the names resized.
        """
        changed = []
        with torch.no_grad():
            for name, r in new_ranks.items():
                old_r = self.A[name].shape[0] if name in self.A else r
                if r == old_r:
                    continue
                grow = r > old_r
                resize = grow_factors if grow else resize_factors
                a, b = resize(self.A[name], self.B[name], r, generator=self.generator)
                for p, data, dim in ((self.A[name], a, 0), (self.B[name], b, 1)):
                    state = self.optimizer.state.pop(p, None)
                    if grow and state:
                        self.optimizer.state[p] = _padded_state(state, p.shape, dim, r - old_r)
                    p.data = data
                    p.grad = None
                changed.append(name)
        return changed

    def load_from(self, snap: AdapterSnapshot) -> None:
        """Roll the factors back to ``snap`` (same modules); optimizer moments are reset."""
        with torch.no_grad():
            for name in self.A:
                for p, src in ((self.A[name], snap.A[name]), (self.B[name], snap.B[name])):
                    p.data = src.detach().to(device=p.device, dtype=p.dtype, copy=True)
                    p.grad = None
                    self.optimizer.state.pop(p, None)

"""Immutable adapter data: what serving reads and what export writes."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping

import torch


def _frozen(d: Mapping) -> Mapping:
    return types.MappingProxyType(dict(d))


def _settled(tensors) -> None:
    """Wait, on this thread, for the CUDA copies just queued into ``tensors``.

    A snapshot is then complete for every reader on any stream (serving, persisting) without
    them waiting on anything. The wait is the publisher's (the training thread's, on its own
    stream); the serving stream is never synchronized. Nothing to do on the CPU.
    """
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


@dataclasses.dataclass(frozen=True, eq=False)
class AdapterSnapshot:
    """One published adapter version: per module ``A (r x in)``, ``B (out x r)``, ``scale``.

    The update of module ``m`` is ``scale[m] * B[m] @ A[m]``. Tensors are private
    clones (detached); treat them as read-only. They stay on the device and in the
    dtype they were made in (a live adapter's: the model's device, float32); export
    copies them to the CPU. Compared by identity, so a batch groups its rows by the
    snapshot object they carry.
    """

    version: int
    A: Mapping[str, torch.Tensor]
    B: Mapping[str, torch.Tensor]
    scale: Mapping[str, float]
    metadata: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if set(self.A) != set(self.B) or set(self.A) != set(self.scale):
            raise ValueError("A, B and scale must name the same modules")
        for name, a in self.A.items():
            b = self.B[name]
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise ValueError(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair")
        # Wrap in read-only views so nobody swaps a module's factors under a reader.
        for field in ("A", "B", "scale", "metadata"):
            object.__setattr__(self, field, _frozen(getattr(self, field)))

    @classmethod
    def from_tensors(cls, version, A, B, scale, metadata=None) -> "AdapterSnapshot":
        """Build from tensors the caller may still mutate: clones and detaches them."""
        if not isinstance(scale, Mapping):
            scale = {name: float(scale) for name in A}
        A = {k: v.detach().clone().requires_grad_(False) for k, v in A.items()}
        B = {k: v.detach().clone().requires_grad_(False) for k, v in B.items()}
        _settled([*A.values(), *B.values()])
        return cls(
            version=int(version),
            A=A,
            B=B,
            scale={k: float(v) for k, v in scale.items()},
            metadata=dict(metadata or {}),
        )

    def to(self, device) -> AdapterSnapshot:
        """The same version with its factors on ``device`` (this snapshot if they are there already),
        e.g. one read from disk, moved once to the model's device instead of at every forward."""
        device = torch.device(device)
        if all(t.device == device for t in (*self.A.values(), *self.B.values())):
            return self
        A = {k: v.to(device) for k, v in self.A.items()}
        B = {k: v.to(device) for k, v in self.B.items()}
        _settled([*A.values(), *B.values()])
        return dataclasses.replace(self, A=A, B=B)

    @property
    def modules(self) -> list[str]:
        return list(self.A)

    @property
    def ranks(self) -> dict[str, int]:
        return {name: int(a.shape[0]) for name, a in self.A.items()}

    @property
    def num_params(self) -> int:
        return sum(a.numel() + self.B[name].numel() for name, a in self.A.items())

    def lora_factors(self, name: str):
        """``(A, B, scale)`` of one module, or None if this adapter leaves it alone."""
        a = self.A.get(name)
        if a is None:
            return None
        return a, self.B[name], self.scale[name]

    def delta(self, name: str) -> torch.Tensor:
        """The dense update ``scale * B @ A`` of one module (out x in)."""
        a, b, s = self.lora_factors(name)
        return (b @ a) * s

    def __repr__(self) -> str:
        total = sum(self.ranks.values())
        return f"AdapterSnapshot(version={self.version}, modules={len(self.A)}, rank_sum={total}, params={self.num_params})"

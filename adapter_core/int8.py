"""Int8 copies of the base model's linear weights for CPU decode steps (``--dtype int8``).

Decoding one token reads every weight once, so on a CPU its speed is set by the bytes of the
weights: int8 reads a quarter of float32's. ``quantize_base(model)`` gives every frozen linear an
int8 copy (one scale per output row) beside its float32 weight:

- a call with few rows (a decode step, a drafted run of tokens, a small batch) reads only the int8
  copy: torch's packed int8 kernel (``_weight_int8pack_mm``, bfloat16 activations). The output
  head, the largest matrix, instead runs oneDNN's int8 GEMM (``torch._int_mm``) on its input
  quantized per row, about twice as fast there and neutral on NLL (a side measurement on 3,000
  held-out tokens: -0.08%); quantizing every layer's input that way cost +0.9% NLL, so only the
  head does.
- a call with many rows (a prefill chunk) and anything that needs gradients (a train step) keeps
  the float32 GEMM. Dequantizing the int8 copy there instead made prefill and train steps about a
  third slower (measured), so the float32 weights stay: the copies add a fifth to the default model's
  memory (2.9 GB against 2.4 GB; the tied output head gets a copy of its own).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DECODE_ROWS = 16  # calls with at most this many rows read the int8 copy
# The packed kernel reads the input in blocks of 16: other widths crashed it or gave NaN (torch 2.13, CPU).
# Layers of other widths (none in the embedded models) keep float32 only.
INPUT_MULTIPLE = 16


def fits(linear: nn.Module) -> bool:
    """Whether the int8 kernels take ``linear``'s width."""
    return linear.in_features % INPUT_MULTIPLE == 0


class Int8Weight:
    """An int8 copy of a frozen ``(out, in)`` weight: int8 rows and one scale per row.

    ``int8_activations``: multiply with the input quantized per row as well (oneDNN's int8 GEMM)
    rather than in bfloat16 (the packed weight-only kernel).
    """

    def __init__(self, weight: torch.Tensor, *, int8_activations: bool = False):
        if weight.shape[1] % INPUT_MULTIPLE:
            raise ValueError(f"int8 copies need an input width that is a multiple of {INPUT_MULTIPLE}, "
                             f"not {weight.shape[1]}")
        w = weight.detach().float()
        self.scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.q = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale_bf16 = self.scale.to(torch.bfloat16)
        self.int8_activations = int8_activations

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` from the int8 copy, in ``x``'s dtype."""
        rows = x.reshape(-1, x.shape[-1])
        if self.int8_activations:
            flat = rows.float()
            x_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
            x_q = torch.round(flat / x_scale).clamp(-127, 127).to(torch.int8)
            y = torch._int_mm(x_q, self.q.t()).float() * x_scale * self.scale  # q.t(): the layout oneDNN is fast on
        else:
            y = torch._weight_int8pack_mm(rows.to(torch.bfloat16).contiguous(), self.q, self.scale_bf16)
        return y.reshape(*x.shape[:-1], self.q.shape[0]).to(x.dtype)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * (4 + 2)


def base_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                int8: Int8Weight | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, through ``int8`` when there is one and the call is a small one
    with gradients off (a train step's layers keep float32 even where their input needs no gradient)."""
    if int8 is None or x.numel() > DECODE_ROWS * x.shape[-1] or torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    y = int8.matmul(x)
    return y if bias is None else y + bias.to(y.dtype)


class Int8Linear(nn.Linear):
    """A frozen ``nn.Linear`` (sharing the original's weight and bias, ties included) with an int8 copy."""

    def __init__(self, base: nn.Linear, *, int8_activations: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.int8 = Int8Weight(base.weight, int8_activations=int8_activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return base_linear(x, self.weight, self.bias, self.int8)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8"


def quantize_base(model: nn.Module) -> int:
    """Give every linear layer of ``model`` an int8 copy, in place, before or after
    ``inject_adapters`` (LoRA layers get theirs as an attribute; plain ones become ``Int8Linear``);
    a layer whose width the kernels do not take keeps float32 only. The output head multiplies with
    int8 activations. Idempotent; returns how many linears have a copy."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or not fits(child):
                continue
            if type(child) is nn.Linear:
                setattr(module, child_name, Int8Linear(child, int8_activations=child is head))
            elif getattr(child, "int8", False) is None:  # a LoraLinear: it holds its copy as an attribute
                child.int8 = Int8Weight(child.weight)
    return sum(getattr(m, "int8", None) is not None for m in model.modules())

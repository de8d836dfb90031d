"""PEFT-format export and import.

Written layout (loads with ``peft.PeftModel.from_pretrained`` and vLLM):

- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` (r x in) and
  ``...lora_B.weight`` (out x r) with our scale folded into B;
- ``adapter_config.json``: LORA, ``rank_pattern`` keyed by full module names,
  ``alpha_pattern == rank_pattern`` (PEFT scale alpha/r = 1), ``r = lora_alpha`` = the
  largest rank, ``target_modules`` = the short names;
- ``dynarank.json``: version, ranks, our scales (to unfold B on import), metadata.

Whatever the snapshot's device and dtype, the file holds float32 CPU copies; ``load_peft``
returns a CPU float32 snapshot (``AdapterSnapshot.to`` moves it to the model's device).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from adapter_core.atomic import recover, write_dir_atomically
from adapter_core.snapshot import AdapterSnapshot

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
OURS = "dynarank.json"
FORMAT_VERSION = 1
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def _peft_config(snap: AdapterSnapshot, base_model_name_or_path: str | None) -> dict:
    ranks = snap.ranks
    r = max(ranks.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in ranks}),
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }


def save_peft(snapshot: AdapterSnapshot, directory, base_model_name_or_path: str | None = None) -> Path:
    """Write ``snapshot`` as a plain PEFT LoRA directory, atomically replacing ``directory``."""
    from safetensors.torch import save_file

    tensors = {}
    for name in snapshot.modules:
        a, b, s = snapshot.lora_factors(name)
        # Fold the scale on the factors' device, then copy to the CPU: safetensors writes host memory.
        tensors[f"{_PREFIX}{name}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"{_PREFIX}{name}.lora_B.weight"] = (b.detach().float() * s).contiguous().cpu()
    ours = {
        "format": FORMAT_VERSION,
        "version": snapshot.version,
        "ranks": snapshot.ranks,
        "scales": dict(snapshot.scale),
        "num_params": snapshot.num_params,
        "metadata": _jsonable(dict(snapshot.metadata)),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(_peft_config(snapshot, base_model_name_or_path), indent=2, sort_keys=True))
        (tmp / OURS).write_text(json.dumps(ours, indent=2, sort_keys=True))

    return write_dir_atomically(directory, write)


def _jsonable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if _is_jsonable(v)}


def _is_jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _pattern_value(patterns: dict, name: str, default):
    # PEFT's rule: the first key that matches a dot-bounded suffix of the module name.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return patterns[key]
    return default


def load_peft(directory) -> AdapterSnapshot:
    """Read our export or any plain PEFT LoRA directory into a snapshot."""
    directory = Path(directory)
    recover(directory)
    config = json.loads((directory / CONFIG).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA adapter: peft_type={config.get('peft_type')}")
    if config.get("use_dora") or config.get("fan_in_fan_out"):
        raise ValueError("DoRA and fan_in_fan_out adapters are not supported")
    if (directory / WEIGHTS).exists():
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS))
    else:
        state = torch.load(directory / "adapter_model.bin", map_location="cpu", weights_only=True)
    A, B = {}, {}
    for key, tensor in state.items():
        m = _KEY.match(key.removeprefix(_PREFIX))
        if m is None:
            continue  # e.g. modules_to_save copies: not LoRA factors
        (A if m["ab"] == "A" else B)[m["module"]] = tensor.float()
    ours = json.loads((directory / OURS).read_text()) if (directory / OURS).exists() else None
    scale = {}
    for name, a in A.items():
        r = a.shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", r))
        peft_scale = alpha / (r**0.5 if config.get("use_rslora") else r)
        ours_scale = (ours or {}).get("scales", {}).get(name)
        if ours_scale:
            # Our own export: unfold the scale so training resumes with the same parametrisation.
            B[name] = B[name] * (peft_scale / ours_scale)
            scale[name] = float(ours_scale)
        else:
            scale[name] = float(peft_scale)
    meta = dict((ours or {}).get("metadata", {}))
    meta.setdefault("base_model_name_or_path", config.get("base_model_name_or_path"))
    return AdapterSnapshot(
        version=int((ours or {}).get("version", 0)), A=A, B=B, scale=scale, metadata=meta
    )

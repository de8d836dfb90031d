"""Checkpoints of fine-tuning jobs: what a job needs to go on where it was after the server restarts.

Beside the job's record ``data_dir/jobs/<id>.json``::

    <id>.examples.safetensors   the training examples, written once, when the job is queued
    <id>.ckpt/                  the latest checkpoint, replaced as a whole (adapter_core.atomic):
        adapter/                    the adapter's factors, version and step (PEFT, adapter_core.save_peft)
        optimizer.safetensors       AdamW's state per factor and the resize generator's state
        policy.pt                   the rank policy's state (tensors, numbers, lists and dicts only)
        state.json                  step, data position, trained tokens, owner (the key's identity: a hash)

Steps take example ``step % len(examples)``, so the step is the data position too; ``position`` is
written as a check that the examples are the ones the checkpoint was trained on. Both go once the job
has ended (``drop``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from adapter_core.atomic import write_dir_atomically
from server.store import write_file_atomic

FORMAT = 1
ADAPTER, OPTIMIZER, POLICY, STATE = "adapter", "optimizer.safetensors", "policy.pt", "state.json"
_GENERATOR = "generator"


class CheckpointError(ValueError):
    """No usable checkpoint: missing, unreadable, or not the job's."""


@dataclasses.dataclass
class Checkpoint:
    snapshot: object  # AdapterSnapshot
    optimizer: dict[str, torch.Tensor]
    policy_state: dict | None
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


def examples_path(root: Path, job_id: str) -> Path:
    return root / f"{job_id}.examples.safetensors"


def checkpoint_dir(root: Path, job_id: str) -> Path:
    return root / f"{job_id}.ckpt"


# -- examples ----------------------------------------------------------------------------------

def save_examples(root: Path, job_id: str, examples: list) -> None:
    """The examples' training fields (what ``examples_batch`` reads): token rows concatenated, one
    offset per example, the per-example strings as JSON in the header."""
    from safetensors.torch import save

    lengths = [len(ex.input_ids) for ex in examples]
    tensors = {
        "input_ids": torch.tensor([t for ex in examples for t in ex.input_ids], dtype=torch.int64),
        "loss_weights": torch.tensor([w for ex in examples for w in ex.loss_weights], dtype=torch.float32),
        "token_classes": torch.tensor([int(c) for ex in examples for c in ex.token_classes], dtype=torch.int64),
        "offsets": torch.cumsum(torch.tensor([0, *lengths], dtype=torch.int64), 0),
        "weights": torch.tensor([ex.weight for ex in examples], dtype=torch.float32),
    }
    meta = [{"edit_type": ex.edit_type, "path": ex.path, "language": ex.language, "fim": ex.fim} for ex in examples]
    data = save(tensors, metadata={"format": str(FORMAT), "examples": json.dumps(meta)})
    write_file_atomic(examples_path(root, job_id), lambda f: f.write(data), "wb")


def load_examples(root: Path, job_id: str) -> list:
    from safetensors import safe_open

    from code_signals.examples import TrainingExample

    path = examples_path(root, job_id)
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["examples"])
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a mapping
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, the job cannot resume from it
        raise CheckpointError(f"examples unreadable: {exc}") from None
    bounds = t["offsets"].tolist()
    ids, losses, classes = t["input_ids"].tolist(), t["loss_weights"].tolist(), t["token_classes"].tolist()
    weights = t["weights"].tolist()
    if len(bounds) != len(meta) + 1 or len(weights) != len(meta) or not meta:
        raise CheckpointError("examples unreadable: their parts do not agree")
    return [TrainingExample(input_ids=ids[a:b], loss_weights=losses[a:b], token_classes=classes[a:b],
                            weight=w, **m)
            for a, b, w, m in zip(bounds, bounds[1:], weights, meta)]


# -- checkpoints -------------------------------------------------------------------------------

def save(root: Path, job_id: str, adapter, policy, state: dict) -> None:
    """Replace the job's checkpoint with ``adapter`` (factors, step, optimizer), ``policy`` and ``state``."""
    from safetensors.torch import save_file

    from adapter_core import save_peft

    snap = adapter.snapshot(bump=False)
    optimizer = {_GENERATOR: adapter.generator.get_state()}
    for kind, params in (("A", adapter.A), ("B", adapter.B)):
        for name, p in params.items():
            for key, value in adapter.optimizer.state.get(p, {}).items():
                value = value if torch.is_tensor(value) else torch.tensor(value)
                optimizer[f"{kind}:{name}:{key}"] = value.detach().cpu().contiguous().clone()
    policy_state = policy.state_dict() if policy is not None else {}

    def write(tmp: Path) -> None:
        save_peft(snap, tmp / ADAPTER)
        save_file(optimizer, str(tmp / OPTIMIZER), metadata={"format": str(FORMAT)})
        torch.save(policy_state, tmp / POLICY)
        (tmp / STATE).write_text(json.dumps({**state, "format": FORMAT}, indent=2, sort_keys=True))

    write_dir_atomically(checkpoint_dir(root, job_id), write)


def load(root: Path, job_id: str) -> Checkpoint:
    from safetensors.torch import load_file

    from adapter_core import load_peft

    d = checkpoint_dir(root, job_id)
    if not (d / STATE).is_file():
        raise CheckpointError("no checkpoint found")
    try:
        state = json.loads((d / STATE).read_text())
        if state.get("format") != FORMAT or not isinstance(state.get("step"), int):
            raise ValueError(f"unknown checkpoint format {state.get('format')!r}")
        snapshot = load_peft(d / ADAPTER)
        optimizer = load_file(str(d / OPTIMIZER))
    except Exception as exc:  # noqa: BLE001 - whatever is wrong with it, the job cannot resume from it
        raise CheckpointError(f"checkpoint unreadable: {exc}") from None
    try:
        policy_state = torch.load(d / POLICY, weights_only=True)
    except Exception:  # noqa: BLE001
        policy_state = None  # the policy starts fresh (new_session_adapter does the same for a bad state)
    return Checkpoint(snapshot, optimizer, policy_state, state)


def restore_optimizer(adapter, tensors: dict[str, torch.Tensor]) -> None:
    """Put a checkpoint's AdamW state (read on the CPU) and generator state back into ``adapter``
    (resumed from its snapshot, on the model's device)."""
    params = {"A": adapter.A, "B": adapter.B}
    state: dict = {}
    for key, value in tensors.items():
        if key == _GENERATOR:
            adapter.generator.set_state(value)
            continue
        kind, rest = key.split(":", 1)
        name, field = rest.rsplit(":", 1)
        p = params[kind].get(name)
        if p is None:
            raise CheckpointError(f"optimizer state of a module the adapter lacks: {name}")
        if value.ndim and value.shape != p.shape:
            raise CheckpointError(f"optimizer state of {name} does not fit its factor")
        # Moments go where their factor is; AdamW keeps its scalar step count on the CPU.
        state.setdefault(p, {})[field] = value.to(p.device) if value.ndim else value
    adapter.optimizer.state.update(state)


def drop(root: Path, job_id: str) -> None:
    """Remove the job's examples and checkpoint (it has ended)."""
    examples_path(root, job_id).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_dir(root, job_id), ignore_errors=True)


def drop_orphans(root: Path, known: set[str]) -> None:
    """Remove the examples and checkpoints of jobs that have no record any more."""
    for path in [*root.glob("ftjob-*.examples.safetensors"), *root.glob("ftjob-*.ckpt")]:
        job_id = path.name.split(".", 1)[0]
        if job_id not in known:
            drop(root, job_id)

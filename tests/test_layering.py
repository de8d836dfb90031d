"""The import structure: packages depend downward only, and no module imports itself in a cycle.

Read from the source with ``ast`` (imports inside functions count too), so a
lazy import cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("code_signals", "adapter_core", "server", "bench", "ide_client")

# Top-level packages and what each may import (besides itself).
ALLOWED = {
    "code_signals": set(),
    "adapter_core": {"code_signals"},
    "server": {"code_signals", "adapter_core"},
    "bench": {"code_signals", "adapter_core", "server"},
    # Talks to the server over the wire only; code_signals for the privacy rules it shares with the
    # server (code_signals.privacy: what may leave the machine). Importing it must not pull in torch.
    "ide_client": {"code_signals"},
}

# Inside server/: each layer may import its own and lower layers only.
SERVER_LAYERS = [
    {"server.errors", "server.json_depth", "server.models", "server.devices"},
    {"server.config"},
    {"server.store"},
    {"server.feedback"},
    {"server.observability"},
    {"server.engines"},
    {"server.sessions"},
    {"server.adaptation"},
    {"server.app"},
    {"server.cli", "server.__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module named by an import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            # `from server.app import routers` names the module server.app.routers.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "node_modules" not in path.parts:
                modules[_module_name(path)] = path
    return {name: {m for m in _imports(path) if m in modules} - {name} for name, path in modules.items()}


GRAPH = _graph()


def _server_layer(module: str) -> int:
    for i, layer in enumerate(SERVER_LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return i
    raise AssertionError(f"{module} is in no layer of SERVER_LAYERS; add it where it belongs")


def test_packages_import_downward_only():
    bad = []
    for module, targets in GRAPH.items():
        top = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != top and other not in ALLOWED[top]:
                bad.append(f"{module} -> {target}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_server_layers_import_downward_only():
    bad = []
    for module, targets in GRAPH.items():
        if not module.startswith("server."):
            continue
        for target in targets:
            if target.startswith("server.") and _server_layer(target) > _server_layer(module):
                bad.append(f"{module} -> {target}")
    assert not bad, "upward imports inside server/:\n" + "\n".join(sorted(bad))


def _packages_of(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_cycles():
    # A package's __init__ importing its own submodules is the normal re-export, not a cycle;
    # any other loop between modules is.
    graph = {m: {t for t in ts if m not in _packages_of(t)} for m, ts in GRAPH.items()}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("server.")))
def test_every_server_module_has_a_layer(module):
    _server_layer(module)

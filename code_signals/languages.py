"""Which language a document is in, and the tree-sitter parser for it.

Grammars come from the per-language PyPI wheels (tree-sitter-python, ...) when
installed, else from tree-sitter-language-pack (which may need its grammar cache
filled once). A language with no grammar is classified lexically instead.
"""

from __future__ import annotations

import functools
import importlib
import os
import re

LANGUAGES = (
    "python",
    "javascript",
    "typescript",
    "tsx",
    "java",
    "go",
    "rust",
    "c",
    "cpp",
)
TEXT = "text"

_EXTENSIONS = {
    ".py": "python",
    ".pyi": "python",
    ".pyw": "python",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".tsx": "tsx",
    ".java": "java",
    ".go": "go",
    ".rs": "rust",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".cxx": "cpp",
    ".c++": "cpp",
    ".hh": "cpp",
    ".hpp": "cpp",
    ".hxx": "cpp",
    ".h++": "cpp",
    ".ipp": "cpp",
}

# Names an explicit field may use (VS Code language ids included).
_ALIASES = {
    "py": "python",
    "python3": "python",
    "js": "javascript",
    "javascriptreact": "javascript",
    "jsx": "javascript",
    "node": "javascript",
    "ts": "typescript",
    "typescriptreact": "tsx",
    "golang": "go",
    "rs": "rust",
    "c++": "cpp",
    "cxx": "cpp",
    "cc": "cpp",
    "objective-cpp": "cpp",
}

_SHEBANGS = {
    "python": "python",
    "node": "javascript",
    "deno": "typescript",
    "ts-node": "typescript",
}

# A .h file is C unless it shows C++-only syntax.
_CPP_HINT = re.compile(
    r"^\s*(class|namespace|template\s*<|public:|private:)|::|\bstd::", re.MULTILINE
)


def normalize_language(name: str | None) -> str | None:
    """The canonical name for `name`, or None when it is not one we parse."""
    if not name:
        return None
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in LANGUAGES else None


def _from_shebang(text: str) -> str | None:
    if not text.startswith("#!"):
        return None
    first = text.split("\n", 1)[0]
    words = first[2:].replace("/", " ").split()
    for word in reversed(words):  # "/usr/bin/env python3" -> python3 -> python
        base = re.sub(r"[\d.]+$", "", word)
        if base in _SHEBANGS:
            return _SHEBANGS[base]
    return None


def detect_language(
    path: str | None = None, text: str | None = None, explicit: str | None = None
) -> str:
    """The document's language: explicit field first, then file extension, then
    shebang line; "text" when none of them names a language we know."""
    lang = normalize_language(explicit)
    if lang:
        return lang
    if path:
        ext = os.path.splitext(str(path))[1].lower()
        lang = _EXTENSIONS.get(ext)
        if lang == "c" and ext == ".h" and text and _CPP_HINT.search(text[:20000]):
            lang = "cpp"
        if lang:
            return lang
    if text:
        lang = _from_shebang(text)
        if lang:
            return lang
    return TEXT


# module name and the function in it that returns the grammar pointer
_WHEELS = {
    "python": ("tree_sitter_python", "language"),
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "java": ("tree_sitter_java", "language"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
}


@functools.cache
def get_language(name: str):
    """The tree_sitter.Language for `name`, or None if no grammar is available."""
    import tree_sitter

    if name not in _WHEELS:
        return None
    module_name, func = _WHEELS[name]
    try:
        module = importlib.import_module(module_name)
        return tree_sitter.Language(getattr(module, func)())
    except (ImportError, AttributeError, TypeError, ValueError):
        pass  # wheel missing or built for another ABI: try the pack
    try:
        from tree_sitter_language_pack import get_language as pack_language

        return pack_language(name)
    except Exception:  # noqa: BLE001 -- the pack's own errors (no network for its cache, unknown name)
        return None


def get_parser(name: str):
    """A fresh tree_sitter.Parser for `name`, or None (parsers are not thread-safe,
    so callers that share one across threads must not)."""
    language = get_language(name)
    if language is None:
        return None
    import tree_sitter

    return tree_sitter.Parser(language)


def has_grammar(name: str) -> bool:
    return get_language(name) is not None

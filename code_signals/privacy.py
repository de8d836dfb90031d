"""Which files may leave the user's machine or reach training: one rule set for the client and the server.

The rules live in privacy_rules.json, which the VS Code extension reads too
(docs/privacy.md). A file is refused when

- a ``.gitignore`` or ``.dynarankignore`` in its directory or above excludes it
  (stricter than git, like the extension: a deeper file cannot re-include what a
  higher one excludes), or it lies in a private directory (``.git``, ``.ssh``...);
- its name looks like a secret (``.env``, ``*.pem``, ``id_rsa``...), or it is a symlink
  (it may point anywhere);
- it is binary (a NUL byte), not UTF-8, or over the size limit;
- its text holds a private key, a known token shape, or a high-entropy value
  assigned to a secret-looking name. detect-secrets adds its vendor-token
  detectors; only those that are fast on whole files (see ``DETECT_SECRETS``).

``PrivacyFilter(root)`` answers for paths under ``root``; without a root (text
that arrived over the network) only names and content are checked.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pathspec

RULES_PATH = Path(__file__).with_name("privacy_rules.json")

# detect-secrets plugins run on whole texts (analyze_string): token shapes with a distinctive
# literal prefix, each a few hundredths of a millisecond per 100 KB. Left out: the keyword and
# high-entropy plugins (per line, about 1 s per 100 KB, and noisy on code: secret_assignment covers
# that case); basic auth, public IPs and JWTs (example URLs, addresses and tokens in tests); AWS
# (no word boundary: it matches DNA and base64 data; the json has a stricter one), Slack and Stripe
# (in the json); and the patterns that start with a character class, 10-100x slower (Discord,
# Telegram, Mailchimp, Artifactory, Cloudant, IBM, Softlayer).
DETECT_SECRETS = (
    "AzureStorageKeyDetector", "GitHubTokenDetector", "GitLabTokenDetector", "NpmDetector", "OpenAIDetector",
    "PypiTokenDetector", "SendGridDetector", "SquareOAuthDetector", "TwilioKeyDetector",
)


@dataclass(frozen=True)
class Rules:
    max_file_bytes: int
    ignore_files: tuple[str, ...]
    private_dirs: frozenset[str]
    secret_names: tuple[str, ...]  # lower-case globs
    secret_content: tuple[tuple[str, re.Pattern], ...]  # (reason, pattern)
    assignment: tuple[re.Pattern, ...]  # one per secret-looking name, on lower-cased bytes
    min_length: int
    min_entropy: float


def _assignment(name: str, min_length: int) -> re.Pattern:
    # One pattern per name, starting with it: a literal start lets the engine skip ahead (one
    # case-insensitive alternation is tens of times slower). Group 1: the name from the keyword
    # on; group 2 or 3: the value.
    # The value ends at its closing quote or at the end of the line (.env, YAML): an unquoted
    # value followed by more code is an expression (x_token = make_token2(...)), not a literal.
    return re.compile(re.escape(name.lower()).encode() + rb"([a-z0-9_.-]*)[\"']?[ \t]*(?::=|=>|=|:)[ \t]*"
                      + rb"(?:[\"']([a-z0-9+/=_~-]{%d,})[\"']|([a-z0-9+/=_~-]{%d,})[ \t]*\r?$)" % (min_length, min_length),
                      re.MULTILINE)


@functools.lru_cache(maxsize=4)
def load_rules(path: str | os.PathLike = RULES_PATH) -> Rules:
    """The rules of a privacy_rules.json; ValueError names the field that is wrong."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        content, reasons = raw["secret_content"], raw["secret_content_reasons"]
        if len(content) != len(reasons):
            raise ValueError("secret_content and secret_content_reasons differ in length")
        assignment = raw["secret_assignment"]
        min_length = int(assignment["min_length"])
        rules = Rules(
            max_file_bytes=int(raw["max_file_bytes"]),
            ignore_files=tuple(raw["ignore_files"]),
            private_dirs=frozenset(d.lower() for d in raw["private_dirs"]),
            secret_names=tuple(g.lower() for g in raw["secret_names"]),
            secret_content=tuple((why, re.compile(p)) for why, p in zip(reasons, content)),
            assignment=tuple(_assignment(n, min_length) for n in assignment["names"]),
            min_length=min_length,
            min_entropy=float(assignment["min_entropy"]),
        )
    except (OSError, KeyError, TypeError, re.error, ValueError) as exc:
        raise ValueError(f"{path}: bad privacy rules: {type(exc).__name__}: {exc}") from None
    if rules.max_file_bytes <= 0:
        raise ValueError(f"{path}: bad privacy rules: max_file_bytes must be positive")
    return rules


def entropy(s: str) -> float:
    """Shannon entropy of the characters of s, in bits per character."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


@functools.lru_cache(maxsize=1)
def _detectors() -> tuple:
    from detect_secrets.core.plugins.util import get_mapping_from_secret_type_to_class  # ~0.25 s: import on use

    return tuple(cls() for cls in get_mapping_from_secret_type_to_class().values() if cls.__name__ in DETECT_SECRETS)


def secret_reason(text: str, rules: Rules | None = None) -> str | None:
    """Why the text holds a secret (private key, token, secret assignment), or None."""
    rules = rules or load_rules()
    for why, pattern in rules.secret_content:
        if pattern.search(text):
            return why
    why = _assigned_secret(text, rules)
    if why is not None:
        return why
    for detector in _detectors():
        if next(iter(detector.analyze_string(text)), None) is not None:
            return f"{detector.secret_type} (detect-secrets)"
    return None


_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_.-")


def _assigned_secret(text: str, rules: Rules) -> str | None:
    data = text.encode("utf-8", "surrogatepass")
    lower = data.lower()  # bytes: ASCII only, so offsets stay those of `data`
    for pattern in rules.assignment:
        for m in pattern.finditer(lower):
            group = 2 if m.start(2) >= 0 else 3
            value = data[m.start(group):m.end(group)].decode()
            if _random_looking(value, rules):
                start = m.start()
                while start and lower[start - 1] in _NAME_CHARS:
                    start -= 1
                return f"secret assigned to {data[start:m.end(1)].decode()}"
    return None


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def _random_looking(value: str, rules: Rules) -> bool:
    # Identifiers and slugs (MBart50Tokenizer, user_profile_12) are words with at most one run of
    # digits; generated secrets scatter digits among letters. UUIDs are ids, not secrets.
    mixed = any(len(re.findall(r"[0-9]+", part)) >= 2 and sum(c.isalpha() for c in part) >= 2
                for part in re.split(r"[_-]", value))
    return (len(value) >= rules.min_length and mixed and not _UUID.fullmatch(value)
            and entropy(value) >= rules.min_entropy)


def _size(n: int) -> str:
    return f"{n // 1024} KiB" if n % 1024 == 0 else f"{n} bytes"


class PrivacyFilter:
    """The rules for one tree (``root``), or for names and texts alone (no root)."""

    def __init__(self, root: str | os.PathLike | None = None, rules: Rules | None = None):
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"{root}: not a directory")
        self.rules = rules or load_rules()
        self._specs: dict[Path, tuple[tuple, pathspec.PathSpec]] = {}  # ignore file -> (its stat, its patterns)

    # -- the API -------------------------------------------------------------------

    def reason(self, rel_path: str | os.PathLike, data: str | bytes | None = None) -> str | None:
        """Why the file must not be sent or trained on, or None when every rule allows it.

        ``data`` is its text or bytes; without it the file is read under root (no root: names only).
        """
        rel = self._relative(rel_path)
        why = self.path_reason(rel)
        if why is not None or (data is None and self.root is None):
            return why
        return (self._text(rel) if data is None else self._decode(data))[1]

    def allows(self, rel_path: str | os.PathLike, data: str | bytes | None = None) -> bool:
        return self.reason(rel_path, data) is None

    def read(self, rel_path: str | os.PathLike) -> tuple[str | None, str | None]:
        """(text, None) of the file under root when every rule allows it, else (None, reason)."""
        rel = self._relative(rel_path)
        why = self.path_reason(rel)
        return (None, why) if why is not None else self._text(rel)

    def path_reason(self, rel_path: str | os.PathLike, is_dir: bool = False, *, parents: bool = True) -> str | None:
        """Why the path alone is refused: private directory, ignore files, secret name, symlink.
        ``parents=False`` skips the checks of its directories (a walk made them on the way down)."""
        rel = self._relative(rel_path)
        parts = rel.split("/")
        dirs = parts if is_dir else parts[:-1]
        if not parents:  # a walk checked the directories above on its way down
            dirs = dirs[-1:] if is_dir else []
        if any(d.lower() in self.rules.private_dirs for d in dirs):
            return "private directory"
        if self.root is not None:
            first = 1 if parents else len(parts)
            for i in range(first, len(parts) + 1):
                why = self._ignored(parts[:i], is_dir or i < len(parts))
                if why is not None:
                    return why
        name = parts[-1].lower()
        if not is_dir and any(fnmatch.fnmatchcase(name, g) for g in self.rules.secret_names):
            return "secret-looking name"
        if self.root is not None and (self.root / rel).is_symlink():
            return "symlink"
        return None

    def walk(self, skip_dir: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str | None]]:
        """(relative path, reason or None) for each file under root by the path rules, sorted, depth first.
        A refused directory comes once, as ``dir/``, and is not entered; so are those ``skip_dir(rel)``
        selects, silently. Contents are checked when read (``read``, ``reason``)."""
        if self.root is None:
            raise ValueError("walk needs a root")

        def visit(directory: Path, prefix: str):
            try:
                entries = sorted(os.scandir(directory), key=lambda e: e.name)
            except OSError as exc:
                yield prefix or ".", f"unreadable: {exc.strerror}"
                return
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    yield rel, "symlink"
                elif entry.is_dir():
                    if skip_dir is not None and skip_dir(rel):
                        continue
                    why = self.path_reason(rel, is_dir=True, parents=False)
                    if why is not None:
                        yield rel + "/", why
                    else:
                        yield from visit(Path(entry.path), rel + "/")
                elif entry.is_file():
                    yield rel, self.path_reason(rel, parents=False)

        yield from visit(self.root, "")

    # -- inside --------------------------------------------------------------------

    def _relative(self, rel_path: str | os.PathLike) -> str:
        """A posix path relative to root. Without a root any path is taken: only its names count
        (it may come from the network; a bad one must not stop the server)."""
        raw = os.fspath(rel_path).replace("\\", "/")
        path = PurePosixPath(raw)
        parts = [p for p in path.parts if p not in ("", ".", "/")]
        if self.root is None:
            return "/".join(p for p in parts if p != "..") or raw or "."
        if path.is_absolute() or ".." in parts or not parts:
            raise ValueError(f"{raw!r}: not a relative path inside {self.root}")
        return "/".join(parts)

    def _ignored(self, parts: list[str], is_dir: bool) -> str | None:
        """Whether an ignore file in a directory above `parts` excludes it."""
        for depth in range(len(parts)):
            rest = "/".join(parts[depth:]) + ("/" if is_dir else "")
            for name in self.rules.ignore_files:
                spec = self._spec(self.root.joinpath(*parts[:depth], name))
                if spec is not None and spec.match_file(rest):
                    return f"ignored by {name}"
        return None

    def _spec(self, path: Path) -> pathspec.PathSpec | None:
        """The parsed ignore file, read again when it changes (a watch outlives edits to it)."""
        try:
            st = path.stat()
        except OSError:
            self._specs.pop(path, None)
            return None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        cached = self._specs.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            lines = ["*"]  # unreadable: exclude its whole directory rather than guess
        spec = _parse_ignore(lines)
        self._specs[path] = (stamp, spec)
        return spec

    def _text(self, rel: str) -> tuple[str | None, str | None]:
        """(text, None) when the content of the file under root is allowed, else (None, reason)."""
        path = self.root / rel
        try:
            if path.stat().st_size > self.rules.max_file_bytes:  # not worth reading
                return None, f"over {_size(self.rules.max_file_bytes)}"
            data = path.read_bytes()
        except OSError as exc:
            return None, f"unreadable: {exc.strerror or exc}"
        return self._decode(data)

    def _decode(self, data: str | bytes) -> tuple[str | None, str | None]:
        """(text, None) when the content is allowed, else (None, reason)."""
        if isinstance(data, str):
            text, size = data, len(data.encode("utf-8", "surrogatepass"))
        else:
            data, text = bytes(data), None
            size = len(data)
        if size > self.rules.max_file_bytes:
            return None, f"over {_size(self.rules.max_file_bytes)}"
        if text is None:
            if b"\0" in data:
                return None, "binary"
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                return None, "not UTF-8"
        elif "\0" in text:
            return None, "binary"
        why = secret_reason(text, self.rules)
        return (None, why) if why is not None else (text, None)


def _parse_ignore(lines: list[str]) -> pathspec.PathSpec:
    # git skips a pattern it cannot parse; so do we, keeping the others.
    try:
        return pathspec.GitIgnoreSpec.from_lines(lines)
    except (ValueError, re.error):
        good = []
        for line in lines:
            try:
                pathspec.GitIgnoreSpec.from_lines([line])
                good.append(line)
            except (ValueError, re.error):
                continue
        return pathspec.GitIgnoreSpec.from_lines(good)


def allowed_files(root: str | os.PathLike, want: Callable[[str], bool] | None = None,
                  skip_dir: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str]]:
    """(relative path, text) of every file under root the rules allow (and ``want(rel)`` selects),
    sorted, depth first; ``skip_dir(rel)`` prunes directories as in ``PrivacyFilter.walk``."""
    privacy = PrivacyFilter(root)
    for rel, why in privacy.walk(skip_dir):
        if why is None and (want is None or want(rel)):
            text, why = privacy._text(rel)
            if why is None:
                yield rel, text

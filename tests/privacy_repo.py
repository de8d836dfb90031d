"""A repository holding every kind of file the privacy rules refuse, beside ordinary source files.

Shared by tests/code_signals/test_privacy.py, the server job tests and the live client tests.
The secrets are put together at run time, so this file itself holds no key-shaped string
(our own rules, and push protection, would flag it).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.helpers import write_tree

KEY_BODY = "MIIEowIBAAKCAQEA7Zq3x9Vt2Lp8Qw4Rk6Yb1Nc5Hd0Fg"
PRIVATE_KEY = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + KEY_BODY + "\n-----END RSA " + "PRIVATE KEY-----\n"
AWS_KEY = "AKIA" + "Q7XK2M4P9RZ3T8WB"
API_TOKEN = "Zx81kQ2mPq7" + "Lr4Tv9Wb3Hs6Jd0"
DB_PASSWORD = "Xk9fQ2mZ7pL4" + "wR8tY3vB"

# path -> (content, the reason PrivacyFilter gives).
REFUSED = {
    ".env": (f"API_KEY={API_TOKEN}\nDEBUG=1\n", "secret-looking name"),
    "deploy.pem": (PRIVATE_KEY, "secret-looking name"),
    "keys/id_rsa": (PRIVATE_KEY, "secret-looking name"),
    "keys/id_rsa.pub": ("ssh-rsa AAAAB3NzaC1yc2E marker_pubkey@laptop\n", "secret-looking name"),
    "config/credentials-prod.json": ('{"marker_credentials": 1}\n', "secret-looking name"),
    "src/secrets.py": (f'AWS_ACCESS_KEY_ID = "{AWS_KEY}"\n', "AWS access key"),
    "src/settings.py": (f'DEBUG = True\nDB_PASSWORD = "{DB_PASSWORD}"\n', "secret assigned to DB_PASSWORD"),
    "src/embedded_key.py": (f'KEY = """{PRIVATE_KEY}"""\n', "private key"),
    "build_output/": ("", "ignored by .gitignore"),  # a directory: refused once, not entered
    "debug.log": ("marker_log line\n", "ignored by .gitignore"),
    "src/private_notes.py": ("marker_private_notes = 1\n", "ignored by .dynarankignore"),
    "src/blob.py": ("marker_blob = 1\n\x00\x01", "binary"),
    "src/latin1.py": (b"marker_latin1 = '\xe9'\n", "not UTF-8"),
    "src/huge.py": ("marker_huge = 1\n" + "x = 1\n" * 100_000, "over 512 KiB"),
    "src/link.py": (None, "symlink"),  # -> ../deploy.pem
}
# Ordinary source files (what must arrive), some with names close to secret ones.
ALLOWED = {
    "src/app.py": "def main():\n    return circle_area(2.0)\n",
    "src/geometry.py": "import math\n\n\ndef circle_area(r):\n    return math.pi * r * r\n",
    "src/tokens.py": "def count_tokens(text):\n    token_count = len(text.split())\n    return token_count\n",
    "sub/id_utils.py": "def next_id(last_id):\n    return last_id + 1\n",
    "web/env_config.ts": "export const envName: string = 'dev';\n",
}
# Strings that must never reach the server (the markers of files refused for other reasons too).
NEVER_SENT = [KEY_BODY, AWS_KEY, API_TOKEN, DB_PASSWORD, "marker_pubkey", "marker_credentials", "marker_build_output",
              "marker_log", "marker_private_notes", "marker_blob", "marker_latin1", "marker_huge"]


def make_private_repo(root: Path) -> Path:
    """Write the repository under root (with a .git marker) and return root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / ".git").mkdir(exist_ok=True)
    files = {
        ".gitignore": "build_output/\n*.log\n",
        ".dynarankignore": "src/private_notes.py\n",
        "build_output/gen.py": "marker_build_output = 1\n",
        **{path: content for path, (content, _) in REFUSED.items() if content},
        **ALLOWED,
    }
    write_tree(root, files)
    os.symlink(Path("..") / "deploy.pem", root / "src" / "link.py")
    return root


def leaked(directory: Path) -> list[str]:
    """'file: string' for every NEVER_SENT string found in a file under directory."""
    found = []
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{path}: {s}" for s in NEVER_SENT if s.encode() in data]
    return found

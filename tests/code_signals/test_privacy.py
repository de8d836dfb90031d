"""code_signals/privacy.py: what may leave the machine or reach training, and why not."""

from __future__ import annotations

import gzip
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from code_signals.privacy import RULES_PATH, PrivacyFilter, allowed_files, entropy, load_rules, secret_reason
from tests.conftest import shared_data_dir
from tests.privacy_repo import ALLOWED, PRIVATE_KEY, REFUSED, make_private_repo

ROOT = Path(__file__).resolve().parents[2]


def token(n: int, seed: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    """A random token, made at run time: this file holds no secret-shaped literal."""
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.fixture
def repo(tmp_path):
    return make_private_repo(tmp_path / "repo")


def test_every_refused_file_with_its_reason_and_ordinary_files_allowed(repo):
    privacy = PrivacyFilter(repo)
    for rel, (_, why) in REFUSED.items():
        path = rel + "gen.py" if rel.endswith("/") else rel  # a file inside the ignored directory
        assert privacy.reason(path) == why, rel
        assert not privacy.allows(path)
    for rel, text in ALLOWED.items():
        assert privacy.reason(rel) is None, rel
        assert privacy.read(rel) == (text, None)
    assert privacy.read("src/secrets.py") == (None, "AWS access key")


def test_walk_and_allowed_files(repo):
    walked = dict(PrivacyFilter(repo).walk())
    # Path rules only: a refused directory comes once and is not entered; contents are checked on reading.
    assert walked["build_output/"] == "ignored by .gitignore" and "build_output/gen.py" not in walked
    assert walked[".git/"] == "private directory"
    assert walked[".env"] == "secret-looking name" and walked["src/link.py"] == "symlink"
    assert walked["src/secrets.py"] is None
    files = dict(allowed_files(repo))
    assert files == {**ALLOWED, ".gitignore": "build_output/\n*.log\n", ".dynarankignore": "src/private_notes.py\n"}
    assert list(files) == [".dynarankignore", ".gitignore", "src/app.py", "src/geometry.py", "src/tokens.py",
                           "sub/id_utils.py", "web/env_config.ts"]  # sorted, depth first
    only_py = dict(allowed_files(repo, want=lambda rel: rel.endswith(".py"), skip_dir=lambda rel: rel == "sub"))
    assert set(only_py) == {"src/app.py", "src/geometry.py", "src/tokens.py"}


def test_names_and_content_without_a_root():
    privacy = PrivacyFilter()  # text that arrived over the network: no ignore files to read
    for name in (".env", "app/.env.production", "CONFIG/.ENV", "id_rsa", "id_ed25519.pub", "x/server.key",
                 "store.p12", "cert.pfx", "release.keystore", ".npmrc", ".pypirc", ".netrc", "credentials.json",
                 "/home/me/project/deploy.pem", ".git/config", "a/.ssh/config.py", ".dynarank/client.json"):
        assert privacy.reason(name) is not None, name
    for name in ("id_utils.py", "identity.py", "env.py", "environment.ts", "keys.py", "src/key_value.go",
                 "token_count.py", "secrets_manager.py", "credentials_test.py", "C:\\work\\app.py", "../up.py"):
        assert privacy.reason(name) is None, name
        assert privacy.reason(name, "x = 1\n") is None, name
    assert privacy.reason("app.py", "KEY = " + repr(PRIVATE_KEY)) == "private key"  # escaped \n in a string
    assert privacy.reason("app.py", "a\x00b") == "binary"
    assert privacy.reason("app.py", b"caf\xe9") == "not UTF-8"


def test_paths_must_stay_inside_the_root(repo):
    privacy = PrivacyFilter(repo)
    for bad in ("../outside.py", "/etc/passwd", "", "."):
        with pytest.raises(ValueError, match="not a relative path"):
            privacy.reason(bad)
    with pytest.raises(ValueError, match="not a directory"):
        PrivacyFilter(repo / "nope")


@pytest.mark.parametrize("text, why", [
    (PRIVATE_KEY, "private key"),
    ("-----BEGIN OPENSSH " + "PRIVATE KEY-----\r\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU=\r\n", "private key"),
    ("-----BEGIN PGP PRIVATE KEY " + "BLOCK-----\n\nlQOYBF" + token(40, 1) + "\n", "private key"),
    ("aws_id = '" + "AKIA" + token(16, 2, string.ascii_uppercase + string.digits) + "'", "AWS access key"),
    ("GH = '" + "ghp_" + token(36, 3) + "'", "GitHub token"),
    ("slack: " + "xoxb-" + token(12, 4, string.digits) + "-" + token(24, 5), "Slack token"),
    ("client = OpenAI(api_key='" + "sk-proj-" + token(64, 6) + "')", "OpenAI API key"),
    ("k = '" + "AIza" + token(35, 7) + "'", "Google API key"),
    ("stripe.key = '" + "sk_live_" + token(24, 8) + "'", "Stripe live key"),
    ('API_KEY = "' + token(32, 9) + '"', "secret assigned to API_KEY"),
    ("  client_secret: " + token(24, 10) + "\n", "secret assigned to client_secret"),  # YAML, unquoted
    ("DB_PASSWORD=" + token(20, 11) + "\n", "secret assigned to DB_PASSWORD"),  # .env style, unquoted
    ('{"auth_token": "' + token(40, 12, string.hexdigits.lower()[:16]) + '"}', "secret assigned to auth_token"),
])
def test_secret_content(text, why):
    assert secret_reason(text) == why


@pytest.mark.parametrize("text", [
    'PEM_HEADER = "-----BEGIN RSA ' + 'PRIVATE KEY-----"\nif line == PEM_HEADER:\n    pass\n',  # no key material
    "token_count = len(tokens)\nmax_tokens = 256\ntokenizer = AutoTokenizer.from_pretrained(name)\n",
    "MBart50TokenizerFast = MBart50Tokenizer\nself.embed_tokens = Qwen2Embedding(config)\n",
    'password = "hunter2"\nsecret = os.environ["SECRET_KEY"]\napi_key = settings.API_KEY_V2\n',
    'update_token = "' + "1a2b3c4d-5e6f-7a8b-9c0d-1e2f3a4b5c6d" + '"\n',  # a UUID is an id
    'password_field = "password_confirmation"\nsecret_name = "MyTestDatabaseSecret1"\n',
    'digest = "' + token(64, 13, "0123456789abcdef") + '"\n',  # a hash under an ordinary name
    '"integrity": "sha512-' + token(86, 14, string.ascii_letters + string.digits + "+/") + '=="\n',  # lockfile
    "ACCATCTCTACCGGTTCGCTAGGCT sequence\n",  # DNA, not an AWS key
])
def test_ordinary_code_is_not_a_secret(text):
    assert secret_reason(text) is None


def test_entropy():
    assert entropy("") == 0 and entropy("aaaa") == 0
    assert entropy("abcd") == pytest.approx(2.0)


def test_ignore_files_at_every_level_and_changes_seen(repo):
    (repo / "pkg" / "gen").mkdir(parents=True)
    (repo / "pkg" / ".gitignore").write_text("*.tmp.py\n!keep.tmp.py\ngen/\n")
    for rel in ("pkg/a.tmp.py", "pkg/keep.tmp.py", "pkg/gen/x.py", "pkg/ok.py", "other.tmp.py"):
        (repo / rel).write_text("x = 1\n")
    (repo / "pkg" / "debug.log").write_text("x\n")
    privacy = PrivacyFilter(repo)
    assert privacy.reason("pkg/a.tmp.py") == "ignored by .gitignore"
    assert privacy.reason("pkg/keep.tmp.py") is None  # negated in the same file
    assert privacy.reason("pkg/gen/x.py") == "ignored by .gitignore"
    assert privacy.reason("pkg/debug.log") == "ignored by .gitignore"  # the root's *.log applies below
    assert privacy.reason("other.tmp.py") is None  # pkg/.gitignore covers pkg/ only
    # Stricter than git, like the extension: a deeper file cannot re-include what a higher one excludes.
    (repo / "pkg" / ".gitignore").write_text("!debug.log\n")
    assert privacy.reason("pkg/debug.log") == "ignored by .gitignore"
    # An ignore file edited while a filter lives (watch) is read again.
    assert privacy.reason("pkg/ok.py") is None
    (repo / ".dynarankignore").write_text("src/private_notes.py\npkg/\n")
    assert privacy.reason("pkg/ok.py") == "ignored by .dynarankignore"
    (repo / ".dynarankignore").write_text("src/private_notes.py\n")
    assert privacy.reason("pkg/ok.py") is None
    (repo / ".dynarankignore").write_text("[z-a]\n\\\nsrc/private_notes.py\n")  # bad lines do not drop the others
    assert privacy.reason("src/private_notes.py") == "ignored by .dynarankignore"


def test_size_limit():
    limit = load_rules().max_file_bytes
    assert limit == 512 * 1024
    privacy = PrivacyFilter()
    assert privacy.reason("a.py", "x" * limit) is None
    assert privacy.reason("a.py", "x" * (limit + 1)) == "over 512 KiB"
    assert privacy.reason("a.py", "é" * (limit // 2 + 1)) == "over 512 KiB"  # bytes, not characters


def test_rules_file_is_plain_for_the_extension(tmp_path):
    raw = json.loads(RULES_PATH.read_text())
    for field in ("secret_names", "secret_content", "secret_content_reasons", "private_dirs", "ignore_files"):
        assert all(isinstance(s, str) for s in raw[field]), field
    assert len(raw["secret_content"]) == len(raw["secret_content_reasons"])
    assert isinstance(raw["max_file_bytes"], int)
    for pattern in raw["secret_content"]:
        # The common subset of Python re and JavaScript RegExp: no Python-only syntax.
        assert "(?P" not in pattern and "\\A" not in pattern and "\\Z" not in pattern, pattern
    bad = tmp_path / "rules.json"
    bad.write_text(json.dumps({**raw, "secret_content_reasons": []}))
    with pytest.raises(ValueError, match="differ in length"):
        load_rules(bad)
    bad.write_text(json.dumps({k: v for k, v in raw.items() if k != "max_file_bytes"}))
    with pytest.raises(ValueError, match="max_file_bytes"):
        load_rules(bad)


def test_the_client_imports_the_rules_without_torch():
    code = ("import sys, code_signals.privacy, ide_client.repo, ide_client.watch, ide_client.finetune; "
            "print(sorted(m for m in ('torch', 'transformers', 'detect_secrets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # detect-secrets too: it is imported when a text is first scanned


@pytest.mark.skipif(shared_data_dir() is None, reason="shared/data is not beside the checkout")
def test_ordinary_repositories_are_not_flagged():
    """The latest version of every file of the four edit histories: real code, none of it secret."""
    files = {}
    for history in sorted(shared_data_dir().glob("*_edits.jsonl.gz")):
        with gzip.open(history, "rt") as f:
            for line in f:
                row = json.loads(line)
                if row["after"]:
                    files[(history.name, row["path"])] = row["after"]
    assert len(files) > 200
    privacy = PrivacyFilter()
    flagged = {key: why for key, text in files.items() if (why := privacy.reason(key[1], text))}
    assert not flagged

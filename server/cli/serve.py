"""`t2serve serve` (and its start-up self-test alone, `serve --self-test`) and
`t2serve prepare-model`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from server.cli.args import add_settings_flags, configure_logging, engine_settings, settings_from
from server.config import (
    EngineSettings,
    LimitSettings,
    ParallelismSettings,
    RecordingSettings,
    ResponsesSettings,
    ServerSettings,
)

# Exit statuses: start-up failed (uvicorn's own code), the engine died while serving (an
# orchestrator should restart the server).
STARTUP_FAILED_EXIT_CODE = 3
ENGINE_DEAD_EXIT_CODE = 4


def add_parsers(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument(
        "--self-test",
        action="store_true",
        help="start the engine, capture one known prompt's hidden states, print the result and exit "
        "(0: states arrived and are well formed; 3: not)",
    )
    add_settings_flags(serve, ServerSettings, "server")
    add_settings_flags(serve, EngineSettings, "engine (passed to vLLM)")
    add_settings_flags(serve, ParallelismSettings, "parallel thinking")
    add_settings_flags(serve, LimitSettings, "limits (docs/operating.md)")
    add_settings_flags(serve, ResponsesSettings, "/v1/responses")
    add_settings_flags(serve, RecordingSettings, "exploration and traffic records")
    serve.set_defaults(run=serve_command)

    prepare = sub.add_parser(
        "prepare-model", help="convert the embedded GGUF model into a vLLM-loadable folder"
    )
    prepare.add_argument("--output", type=Path, help="target folder (default: the t2serve cache)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    prepare.set_defaults(run=prepare_model)


def serve_settings(args: argparse.Namespace) -> ServerSettings:
    """`serve`'s settings: every flag, --policy read (@PATH: from `t2serve tune`'s file) and
    checked, T2SERVE_API_KEYS added to --api-key."""
    from estimator.policy_spec import parse_policy, spec_from_flag

    try:  # the defaults it fills in do not matter here, only whether the spec is valid
        args.policy_file = args.policy[1:] if args.policy.startswith("@") else None  # SIGHUP re-reads it
        args.policy = spec_from_flag(args.policy)
        parse_policy(args.policy, fixed_n=1, margin=1.0)
    except ValueError as exc:
        raise SystemExit(f"t2serve: --policy: {exc}") from None
    return settings_from(
        ServerSettings,
        args,
        engine=engine_settings(args),
        api_keys=[*args.api_keys, *_env_keys("T2SERVE_API_KEYS")],
        admin_keys=[*args.admin_keys, *_env_keys("T2SERVE_ADMIN_KEYS")],
    )


def _env_keys(variable: str) -> list[str]:
    return [k.strip() for k in os.environ.get(variable, "").split(",") if k.strip()]


def serve_command(args: argparse.Namespace) -> None:
    import uvicorn

    from server.app import create_app

    settings = serve_settings(args)
    configure_logging(settings.log_level)
    if args.self_test:
        sys.exit(self_test(settings))

    def stop() -> None:
        server.should_exit = True

    app = create_app(settings, on_engine_dead=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # SIGTERM: stop accepting, let in-flight requests finish (bounded), then the lifespan
        # stops the engine.
        timeout_graceful_shutdown=settings.limits.drain_timeout_s,
    )
    server = uvicorn.Server(config)
    server.run()
    if getattr(app.state, "engine_failed", False):
        sys.exit(ENGINE_DEAD_EXIT_CODE)
    if not server.started:
        sys.exit(STARTUP_FAILED_EXIT_CODE)  # the cause is logged above


def self_test(settings: ServerSettings) -> int:
    """`serve --self-test`: the start-up capture check on its own, as an exit status."""
    from server.engine.engine import Engine

    async def run() -> int:
        engine = await Engine.start(settings.engine)
        try:
            return await report_self_test(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(run())


async def report_self_test(engine: Any) -> int:
    """Run the engine's capture self-test: print its report as one JSON line and return 0,
    or print why it failed and return the start-up failure status (3)."""
    import json

    from server.engine.engine import CaptureSelfTestError

    try:
        print(json.dumps({"self_test": "ok", **await engine.self_test()}), flush=True)
        return 0
    except CaptureSelfTestError as exc:
        print(f"t2serve: {exc}", file=sys.stderr, flush=True)
        return STARTUP_FAILED_EXIT_CODE


def prepare_model(args: argparse.Namespace) -> None:
    from server.engine.model_store import prepare_embedded_model, verify_model_dir

    folder = prepare_embedded_model(args.output, force=args.force)
    ok = verify_model_dir(folder)
    print(f"{folder} ({'verified' if ok else 'NOT verified'})")
    sys.exit(0 if ok else 1)

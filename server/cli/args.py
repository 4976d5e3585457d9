"""Flags generated from server/config.py's settings, and settings built back from them.

Every field of a settings model is a flag named after it (`default_parallelism` →
`--default-parallelism`) whose default and help are the field's own default and
description, so each lives once, in server/config.py. The tables below hold the few
departures from that rule: flags spelled otherwise (names deploy manifests already use),
off switches, and fields the command line does not set.
"""

from __future__ import annotations

import argparse
import logging
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from estimator.policies import policy_names
from server.config import EngineSettings

Settings = TypeVar("Settings", bound=BaseModel)

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Fields whose flag is not `--` + the field's name.
FLAG_NAMES = {
    "api_keys": "--api-key",  # repeatable: one key per flag
    "admin_keys": "--admin-key",
    "cpu_kvcache_space_gib": "--cpu-kvcache-space",
    "queue_timeout_s": "--queue-timeout",
    "request_timeout_s": "--request-timeout",
    "drain_timeout_s": "--drain-timeout",
    "sse_keepalive_s": "--sse-keepalive",
    "reload_watch_interval_s": "--reload-watch-interval",
}
# Booleans that are on by default, turned off by one flag (as vLLM spells them).
OFF_SWITCHES = {
    "enable_prefix_caching": "--no-prefix-caching",
    "log_stats": "--disable-log-stats",
    "store": "--no-store",
}
# Settings the command line leaves at their defaults.
NO_FLAG = {"enable_chunked_prefill", "capture_timeout_s", "policy_file"}
# Choices a `str` field's flag accepts.
CHOICES = {"log_level": LOG_LEVELS}
# Registered names listed in a flag's help.
NAMES: dict[str, Callable[[], list[str]]] = {"policy": policy_names}


def _seconds_or_none(text: str) -> float | None:
    seconds = float(text)
    return seconds or None


# Flags whose text is read otherwise than by the field's type.
PARSERS: dict[str, Callable[[str], Any]] = {"request_timeout_s": _seconds_or_none}


def configure_logging(level: str) -> None:
    """Logging at a --log-level."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def flag_of(name: str) -> str | None:
    """The flag that sets field `name`, or None for a field the command line does not set."""
    if name in NO_FLAG:
        return None
    return OFF_SWITCHES.get(name) or FLAG_NAMES.get(name) or "--" + name.replace("_", "-")


def _is_settings(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse`, with 'none' for an unset optional setting."""

    def parse_or_none(text: str) -> Any:
        return None if text.lower() == "none" else parse(text)

    parse_or_none.__name__ = parse.__name__  # argparse names it in "invalid int value"
    return parse_or_none


def _flag_options(name: str, field: FieldInfo) -> dict[str, Any]:
    """argparse options for a field: action, type and choices read from its annotation."""
    annotation, optional = field.annotation, False
    if get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation):
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
        optional = True
    if name in OFF_SWITCHES:
        return {"action": "store_false"}
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is Literal:
        return {"choices": get_args(annotation)}
    if get_origin(annotation) is list:
        return {"action": "append", "type": get_args(annotation)[0]}
    parse = PARSERS.get(name, annotation)
    return {"type": _or_none(parse) if optional else parse, "choices": CHOICES.get(name)}


def _default(field: FieldInfo) -> Any:
    """The field's default; None for a required field (its value is resolved from others)."""
    return None if field.is_required() else field.get_default(call_default_factory=True)


def _help(name: str, field: FieldInfo) -> str:
    text = (field.description or "").replace("%", "%%")
    if name in NAMES:
        text += f" (registered: {', '.join(NAMES[name]())})"
    if name in OFF_SWITCHES:
        return f"turn off {text}"
    default = _default(field)
    return text if default is None or default == [] else f"{text} (default: %(default)s)"


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel], title: str) -> None:
    """One flag per field of `model` (nested settings models aside: each is a group of its own)."""
    group = parser.add_argument_group(title)
    for name, field in model.model_fields.items():
        flag = flag_of(name)
        if flag is None or _is_settings(field.annotation):
            continue
        options = _flag_options(name, field)
        if name in FLAG_NAMES:  # the flag's name, not the field's, in the usage line
            options["metavar"] = flag.removeprefix("--").replace("-", "_").upper()
        group.add_argument(flag, dest=name, default=_default(field), help=_help(name, field), **options)


def settings_from(kind: type[Settings], args: argparse.Namespace, /, **given: Any) -> Settings:
    """Settings of `kind` from the parsed flags named after its fields (nested settings
    alike); `given` fields are taken as they are. A value `kind` refuses exits with its reason."""
    values: dict[str, Any] = {}
    for name, field in kind.model_fields.items():
        if name in given:
            continue
        if _is_settings(field.annotation):
            values[name] = settings_from(field.annotation, args)
        elif name in vars(args):
            values[name] = getattr(args, name)
    try:
        return kind(**values, **given)
    except ValidationError as exc:
        raise SystemExit(f"t2serve: {exc}") from None


def engine_settings(args: argparse.Namespace) -> EngineSettings:
    """The engine flags' settings: --model's folder (checked), else the embedded model's."""
    if args.model:
        model = Path(args.model).expanduser()
        if not (model / "config.json").is_file():
            raise SystemExit(f"t2serve: --model {model} is not a Hugging Face model folder (no config.json)")
    else:
        from server.engine.model_store import prepare_embedded_model

        model = prepare_embedded_model()
    return settings_from(
        EngineSettings, args, model=str(model), served_model_name=args.served_model_name or model.name
    )

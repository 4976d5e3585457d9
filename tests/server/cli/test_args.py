"""server/cli/args.py: every settings field is a flag whose default is the field's, and a
flag's value reaches the settings unchanged (no engine: parsing and settings only)."""

from __future__ import annotations

import argparse
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from pydantic import BaseModel

from server.cli import build_parser
from server.cli.args import FLAG_NAMES, NO_FLAG, OFF_SWITCHES, flag_of
from server.cli.serve import serve_settings
from server.config import EngineSettings, LimitSettings, ParallelismSettings, ServerSettings

MODELS = (ServerSettings, EngineSettings, ParallelismSettings, LimitSettings)
# Where each model's fields land in ServerSettings.
PLACE = {
    ServerSettings: None,
    EngineSettings: "engine",
    ParallelismSettings: "parallelism",
    LimitSettings: "limits",
}
# Values the type alone does not give: a valid policy spec, and the folder flags (checked or
# resolved: --model must be a model folder, --served-model-name defaults from it).
SAMPLES = {"policy": ("esc:window=3", "esc:window=3"), "served_model_name": ("clients-name", "clients-name")}


def subparser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def flagged_fields() -> list[tuple[type[BaseModel], str]]:
    return [
        (model, name)
        for model in MODELS
        for name, field in model.model_fields.items()
        if name not in NO_FLAG
        and not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    ]


def sample(name: str, annotation: Any, default: Any) -> tuple[list[str], Any]:
    """A command line for field `name` that sets a value other than its default, and that value."""
    if name in SAMPLES:
        text, value = SAMPLES[name]
        return [flag_of(name), text], value
    if name in OFF_SWITCHES:
        return [OFF_SWITCHES[name]], False
    if get_origin(annotation) in (Union, types.UnionType):  # X | None
        (annotation,) = (a for a in get_args(annotation) if a is not type(None))
    if annotation is bool:
        return ([f"--no-{flag_of(name)[2:]}"] if default else [flag_of(name)]), not default
    if get_origin(annotation) is Literal:
        value = next(v for v in get_args(annotation) if v != default)
        return [flag_of(name), value], value
    if get_origin(annotation) is list:
        return [flag_of(name), "k1", flag_of(name), "k2"], ["k1", "k2"]
    if name == "log_level":
        return [flag_of(name), "debug"], "debug"
    if annotation is str:
        return [flag_of(name), "some-value"], "some-value"
    value = annotation((default or 2) * 3)
    return [flag_of(name), str(value)], value


def value_in(settings: ServerSettings, model: type[BaseModel], name: str) -> Any:
    place = PLACE[model]
    return getattr(settings if place is None else getattr(settings, place), name)


def test_every_flagged_field_round_trips_from_its_flag_to_the_settings(model_dir, monkeypatch):
    monkeypatch.delenv("T2SERVE_API_KEYS", raising=False)
    base = ["serve", "--model", str(model_dir)]
    checked = 0
    for model, name in flagged_fields():
        if name == "model":
            continue  # base names it; checked below
        field = model.model_fields[name]
        argv, expected = sample(name, field.annotation, None if field.is_required() else field.default)
        settings = serve_settings(build_parser().parse_args([*base, *argv]))
        assert value_in(settings, model, name) == expected, (name, argv)
        checked += 1
    assert checked >= 40  # every setting of the four models but the folder and the unflagged ones
    assert serve_settings(build_parser().parse_args(base)).engine.model == str(model_dir)


def test_optional_settings_take_none_and_the_request_timeout_takes_zero(model_dir):
    args = build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--estimator-head", "none", "--request-timeout", "0"]
    )
    settings = serve_settings(args)
    assert settings.parallelism.estimator_head is None and settings.limits.request_timeout_s is None
    args = build_parser().parse_args(["serve", "--estimator-temperature-tolerance", "None"])
    assert args.estimator_temperature_tolerance is None


def test_parser_defaults_are_the_settings_defaults(model_dir, monkeypatch):
    """Fails if a flag's default differs from its field's: the default lives on the field."""
    serve = subparser("serve")
    actions = {a.dest: a for a in serve._actions}
    for model, name in flagged_fields():
        field = model.model_fields[name]
        assert name in actions, f"{model.__name__}.{name} has no flag"
        expected = None if field.is_required() else field.get_default(call_default_factory=True)
        assert actions[name].default == expected, name
    # ... and a bare command line gives the settings models' own defaults.
    monkeypatch.delenv("T2SERVE_API_KEYS", raising=False)
    built = serve_settings(build_parser().parse_args(["serve", "--model", str(model_dir)]))
    assert built == ServerSettings(
        engine=EngineSettings(model=str(model_dir), served_model_name=model_dir.name)
    )


def test_the_engine_flags_of_label_are_generated_alike():
    label = {a.dest: a.default for a in subparser("label")._actions}
    for name, field in EngineSettings.model_fields.items():
        if name not in NO_FLAG and not field.is_required():
            assert label[name] == field.default, name


def test_flag_spellings_deploy_files_use_are_kept():
    serve = subparser("serve")
    options = {o for a in serve._actions for o in a.option_strings}
    kept = {
        *FLAG_NAMES.values(),
        *OFF_SWITCHES.values(),
        "--default-parallelism",
        "--capture",
        "--no-capture",
    }
    assert kept <= options
    assert "--enable-prefix-caching" not in options and "--log-stats" not in options


def test_help_is_the_field_description_with_its_default():
    help_text = " ".join(subparser("serve").format_help().split())  # unwrapped
    tie_break = ParallelismSettings.model_fields["tie_break"].description
    assert f"{tie_break} (default: order)" in help_text  # % shown as itself, not as a format
    assert "(registered: " in help_text and "t2+beta" in help_text  # --policy lists the policies
    assert "turn off automatic prefix caching" in help_text


def test_a_value_the_settings_refuse_exits_with_the_reason(model_dir):
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--default-parallelism", "0"])
    with pytest.raises(SystemExit, match="default_parallelism"):
        serve_settings(args)


def test_bad_model_folder_is_refused(tmp_path: Path):
    args = build_parser().parse_args(["serve", "--model", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a Hugging Face model folder"):
        serve_settings(args)

"""The CLI explains itself: every flag of run / sweep / search / attack has help, its default and its
choices, generated from the config classes (so the help cannot drift from the config)."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from medtune._fielddoc import field_docs, flag_help
from medtune.cli import build_parser, main
from medtune.config import RunConfig, SweepConfig
from medtune.deft.driver import SearchConfig
from medtune.robustness.config import AuditConfig


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[name]


@pytest.mark.parametrize("command", ["run", "sweep", "search", "attack"])
def test_every_flag_has_help_with_default_and_choices(command):
    missing = []
    for action in _subparser(command)._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        if not text.strip() or "default:" not in text:
            missing.append(action.option_strings or action.dest)
        if action.metavar and str(action.metavar).startswith("{") and "choices:" not in text:
            missing.append((action.option_strings, "choices"))
        if action.choices and "choices:" not in text:
            missing.append((action.option_strings, "choices"))
    assert not missing, f"flags without help, default or choices: {missing}"


@pytest.mark.parametrize("cls", [RunConfig, SweepConfig, SearchConfig, AuditConfig])
def test_every_config_field_is_documented(cls):
    docs = field_docs(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "base"]
    assert [n for n in names if not docs.get(n)] == []
    for name in getattr(cls, "CHOICES", {}):
        assert name in names  # a CHOICES entry names a real field


def test_help_is_the_config_fact():
    # choices and default come from RunConfig itself: change them there and the help follows
    text = flag_help(RunConfig, "optimizer")
    assert text.endswith("(choices: adamw, sgd, adam; default: adamw)")
    assert "adamw" in RunConfig.CHOICES["optimizer"]
    assert flag_help(SearchConfig, "infeasible").endswith("(choices: penalty, repair; default: penalty)")
    assert "default: 0.04" not in flag_help(AuditConfig, "zetas")
    assert flag_help(AuditConfig, "zetas").endswith("(default: 0.02,0.04,0.08)")


def test_sweep_help_prints_every_flag_with_default(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--optimizer {adamw,sgd,adam}, --opt {adamw,sgd,adam}" in out
    assert "(choices: adamw, sgd, adam; default: adamw)" in out
    assert "(default: linear,full)" in out  # the sweep's own default, not the base run's
    assert "(choices: eval, train; default: eval)" in out


def test_version(capsys):
    import medtune

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"medtune {medtune.__version__}"


def test_timm_aliases_reach_the_same_field():
    args = build_parser().parse_args(["run", "--model", "resnet18", "--opt", "sgd", "--smoothing", "0.1"])
    assert (args.arch, args.optimizer, args.label_smoothing) == ("resnet18", "sgd", 0.1)


def test_invalid_choice_is_one_line(capsys):
    assert main(["run", "--data", "synthetic", "--optimizer", "adamm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optimizer" in err[0] and "adamw" in err[0]


def _all_parsers(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _all_parsers(sub, (*prefix, name))
    yield " ".join(prefix), parser


def test_every_optional_flag_of_every_command_says_its_default():
    missing = []
    for name, parser in _all_parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            optional = bool(action.option_strings) or action.nargs in ("?", "*")
            if optional and "default:" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings or action.dest}")
            if action.choices and "choices:" not in (action.help or ""):
                missing.append(f"{name} {action.option_strings or action.dest} (choices)")
    assert not missing, missing

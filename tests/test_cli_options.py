"""The command line's safety options come from the shared settings schema: every safety setting has an option,
and the options become the engine's settings."""

from __future__ import annotations

import pytest

from safeinfer_integrations.cli import build_parser, main
from safeinfer_integrations.cli.options import generation_settings, safety_settings
from safeinfer_integrations.runtime.config import CONFIG_FIELDS
from safeinfer_integrations.runtime.settings import SAFETY_FIELDS, SafeInferSettings


def test_the_schema_covers_every_safety_setting() -> None:
    assert set(SAFETY_FIELDS) == set(CONFIG_FIELDS)
    assert all(SafeInferSettings.model_fields[name].description for name in SafeInferSettings.model_fields)


def test_options_become_engine_settings() -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "generate",
            "hi",
            "--alpha",
            "0.5",
            "--no-gate-question",
            "--gate-cutoff",
            "0.2",
            "--unsafe-expert",
            "negated_vector",
            "--stop",
            "END",
            "--layer",
            "3",
        ]
    )
    assert safety_settings(args) == {
        "alpha": 0.5,
        "gate_question": False,
        "gate_cutoff": 0.2,
        "unsafe_expert": "negated_vector",
        "layer": 3,
    }
    assert generation_settings(args) == {
        "max_new_tokens": 128,
        "temperature": 0.0,
        "stop": ["END"],
        **safety_settings(args),
    }
    assert safety_settings(parser.parse_args(["generate", "hi", "--no-gate"])) == {"gate": False}
    assert safety_settings(parser.parse_args(["generate", "hi"])) == {}


def test_a_bad_value_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["eval", "--harmful", "x.csv", "--out", "/tmp/x", "--framings", "bare,sideways"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "safeinfer: error: framings must be some of bare, system, rag, agent, agent_lc; got 'bare,sideways'"
    )


def test_every_option_has_help_and_the_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from safeinfer_integrations import __version__
    from safeinfer_integrations.cli import build_parser, main

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, command in commands.items()
        for action in command._actions
        if action.help is None and not isinstance(action, argparse._HelpAction)
    ]
    assert not missing
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"safeinfer {__version__}"

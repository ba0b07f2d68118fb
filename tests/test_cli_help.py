"""The osbc command's --help and the README's command lines stay true to the parser."""

import argparse
import re
import shlex
from pathlib import Path

import pytest

from osbc.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def subparsers():
    p = build_parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("name", list(subparsers()))
def test_every_option_has_help_and_shows_its_default(name):
    p = subparsers()[name]
    fmt = p._get_formatter()
    for a in options(p):
        assert a.help and a.help != argparse.SUPPRESS, f"osbc {name} {a.option_strings[0]} has no help"
        has_value = a.default not in (None, False, [], argparse.SUPPRESS) and not a.required
        if has_value:
            assert "default" in fmt._get_help_string(a), f"osbc {name} {a.option_strings[0]} hides its default"
    p.format_help()  # every help text is a valid %-format


def test_help_texts():
    cmds = subparsers()

    def text(name):  # the help without argparse's line wrapping
        return " ".join(cmds[name].format_help().split())

    prune = text("prune")
    for want in ("(default: lamp)", "(default: auto)", "(default: 256)", "(default: 64)", "(default: osbc)",
                 "magnitude: smallest weights first", "(default: dense)", "(default: train)"):
        assert want in prune, want
    assert "(default: 0.5,0.9,0.97)" in text("demo")
    assert "which part of the data set to evaluate on (default: test)" in text("eval")
    # eval draws no calibration samples; info reads no data
    assert "--calib-samples" not in text("eval")
    assert "--data" not in text("info") and "--device" not in text("info")


def readme_commands():
    """Every ``osbc ...`` line in the README's shell blocks (continuations joined, comments cut)."""
    text = README.read_text()
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("osbc "):
                lines.append(line)
    return lines


def test_readme_command_lines_parse():
    cmds = readme_commands()
    assert len(cmds) >= 10
    parser = build_parser()
    for line in cmds:
        try:
            args = parser.parse_args(shlex.split(line)[1:])
        except SystemExit as e:  # argparse rejected it
            pytest.fail(f"README line does not parse ({e.code}): {line}")
        assert callable(args.func)

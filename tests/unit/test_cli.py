"""The `tusk` command dispatches to components and fails in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tusk.cli import SUBCOMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_unknown_command_is_one_line(capsys):
    assert main(["nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'nope'" in err[0]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_each_subcommand_has_help(command):
    result = subprocess.run(
        [sys.executable, "-m", "tusk", command, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-1500:]
    assert "usage" in result.stdout.lower()

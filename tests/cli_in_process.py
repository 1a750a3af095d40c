"""``peftbench ARGS`` run in the test's own process (the runs' fork server is then shared
between tests, and monkeypatches apply), with its exit code and output."""

from __future__ import annotations

import sys


def run_main(capsys, monkeypatch, *args: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``peftbench ARGS`` through the CLI's ``main``."""
    from peftbench.cli import main

    monkeypatch.setattr(sys, "argv", ["peftbench", *args])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_main_merged(capsys, monkeypatch, *args: str) -> tuple[int, str]:
    """(exit code, stdout + stderr) of ``peftbench ARGS``."""
    code, out, err = run_main(capsys, monkeypatch, *args)
    return code, out + err

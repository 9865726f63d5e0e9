"""The entry point: building the parser, ``--help`` of every command and refusing bad arguments import
no torch (nor numpy), and a bad argument is one line with exit status 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from plmetric.cli import build_parser, main
from plmetric.cli.dispatch import COMMANDS

#: Bad arguments that the parser itself refuses (a missing value, a value its type rejects, a bad choice).
BAD_ARGUMENTS = [
    ["train", "--set"],
    ["train", "--out", "run", "--method", "nonsense"],
    ["train", "--out", "run", "--stop-after", "0"],
    ["index", "images", "--batch-size", "0"],
    ["index", "images", "--image-size", "4096"],
    ["duplicates", "pile.safetensors", "--out", "d.csv", "--threshold", "2"],
    ["groups", "pile.safetensors", "--out", "g.csv", "--method", "dbscan"],
    ["export", "model.safetensors", "--out", "m.onnx", "--format", "tflite"],
    ["no-such-command"],
    [],
]


def command_names() -> list[str]:
    return list(build_parser()._subparsers._group_actions[0].choices)


def test_every_command_is_in_the_parser() -> None:
    assert len(command_names()) == len(COMMANDS)


def test_help_and_bad_arguments_import_no_torch() -> None:
    """In a fresh interpreter (this one has torch already): the parser, ``--help`` of the program and
    of every command, and every bad argument of :data:`BAD_ARGUMENTS` leave torch and numpy unimported
    (importing torch is seconds of a ``--help`` that should take a fraction of one)."""
    script = textwrap.dedent(
        f"""
        import contextlib, io, sys
        from plmetric.cli import main
        from plmetric.cli.dispatch import build_parser

        names = list(build_parser()._subparsers._group_actions[0].choices)
        calls = [["--help"], ["--version"]] + [[name, "--help"] for name in names] + {BAD_ARGUMENTS!r}
        for argv in calls:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = main(argv)
            assert code == (2 if argv in {BAD_ARGUMENTS!r} else 0), (argv, code)
        heavy = ("torch", "numpy", "PIL", "torchvision", "timm", "scipy", "sklearn")
        loaded = sorted(m for m in heavy if m in sys.modules)
        print(len(calls), loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    count, loaded = done.stdout.split(" ", 1)
    assert int(count) == 2 + len(COMMANDS) + len(BAD_ARGUMENTS)
    assert loaded.strip() == "[]", f"building the parser and parsing imported {loaded.strip()}"


@pytest.mark.parametrize("argv", BAD_ARGUMENTS, ids=lambda argv: " ".join(argv) or "nothing")
def test_a_bad_argument_is_one_line_and_exit_status_2(argv, capsys) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("plmetric") and "error:" in lines[0], captured.err
    assert lines[0].endswith("--help)"), lines[0]  # it points to the help


@pytest.mark.parametrize("command", [[], *([name] for name in ("train", "index", "duplicates", "groups"))])
def test_help_shows_the_defaults_read_from_the_options(command, capsys) -> None:
    """The help texts that read their numbers from plmetric.core.options say them."""
    from plmetric.core import options

    assert main([*command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    expected = {
        (): ["train", "similarity-study"],
        ("train",): [*options.METHOD_REGISTRY],
        ("index",): [f"exact below {options.AUTO_EXACT_BELOW:,} vectors, else {options.AUTO_KIND}"],
        ("duplicates",): [f"default: {options.DUPLICATES_THRESHOLD}", f"default: {options.DUPLICATES_CANDIDATES}"],
        ("groups",): [*options.GROUPS_METHODS, f"slow above {options.GROUPS_HDBSCAN_MAX:,} images"],
    }[tuple(command)]
    for phrase in expected:
        assert phrase in text, phrase

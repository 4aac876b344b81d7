"""--help at any width (issue 18 §3): cli/help.py lays out every command's help and the group's for
the terminal it has: columns when they fit, stacked otherwise, and nothing ever cut (no "…", no
option name or choice broken), the usage line as everyone writes it (INPUT, [INPUT], INPUT...)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from itertools import pairwise
from typing import Annotated, Optional

import pytest
import typer

from ckptsurgery.cli import app
from ckptsurgery.cli.declare import Argument, Option
from ckptsurgery.cli.help import HelpCommand, Piece, wrap

LORA = ("lora fold", "lora extract", "lora merge", "lora resize", "lora convert")
COMMANDS = ("", "inspect", "filter", "drop", "rename", "merge", "extract-lora", "lora", *LORA, "convert", "diff")
LEAVES = tuple(c for c in COMMANDS[1:] if c != "lora")  # commands, not groups of them
WIDTHS = (60, 80, 120)


def click_command(name: str):
    command = typer.main.get_command(app)
    for word in name.split():  # "lora merge": the group's command
        command = command.get_command(None, word)
    return command


def help_at(cli, monkeypatch, command: str, width: int) -> str:
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.delenv("TERMINAL_WIDTH", raising=False)
    result = cli(*command.split(), "--help")
    assert result.code == 0 and "Usage:" in result.out, result
    return result.out


def params(name: str):
    command = click_command(name)
    with command.make_context(name or "ckptsurgery", [], resilient_parsing=True) as ctx:
        return command.get_params(ctx)


def panel(text: str, title: str) -> list[str]:
    """A panel's lines, without its borders."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"╭─ {title} ─"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("╰"))
    return [line[2:-2].rstrip() for line in lines[start + 1 : end]]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_the_terminal_and_cuts_no_text_at_any_width(cli, monkeypatch, command, width):
    text = help_at(cli, monkeypatch, command, width)
    assert max(map(len, text.splitlines())) <= width, [line for line in text.splitlines() if len(line) > width]
    assert "…" not in text, [line for line in text.splitlines() if "…" in line]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_name_appears_whole(cli, monkeypatch, command, width):
    text = help_at(cli, monkeypatch, command, width)
    words = set(re.split(r"[\s│,/]+", text))
    names = [name for param in params(command) if param.param_type_name == "option"
             for name in (*param.opts, *param.secondary_opts)]
    assert names and not [name for name in names if name not in words]


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_choice_appears_whole_and_a_choice_list_breaks_only_after_a_bar(cli, monkeypatch, command, width):
    text = help_at(cli, monkeypatch, command, width)
    choices = {str(getattr(c, "value", c)) for param in params(command) for c in getattr(param.type, "choices", ()) or ()}
    # every piece of a choice list (<a|b|, c|d>, ...) on any line: a whole value, never "fl" + "oat32"
    listed = [part for word in re.split(r"[\s│]+", text)
              if re.fullmatch(r"<?[\w.-]*(?:\|[\w.-]*)+>?|<[\w.-]+>?|[\w.-]+>", word)
              for part in re.split(r"[<>|]", word) if re.search(r"\w", part)]
    assert set(listed) <= choices, sorted(set(listed) - choices)
    assert choices <= set(listed), sorted(choices - set(listed))


USAGE = {"": "ckptsurgery [OPTIONS] COMMAND [ARGS]...", "inspect": "ckptsurgery inspect [OPTIONS] INPUT...",
         "filter": "ckptsurgery filter [OPTIONS] INPUT", "drop": "ckptsurgery drop [OPTIONS] INPUT PATTERN...",
         "rename": "ckptsurgery rename [OPTIONS] INPUT", "merge": "ckptsurgery merge [OPTIONS] [SOURCE...]",
         "extract-lora": "ckptsurgery extract-lora [OPTIONS] BASE TUNED",
         "convert": "ckptsurgery convert [OPTIONS] INPUT", "diff": "ckptsurgery diff [OPTIONS] A B",
         "lora": "ckptsurgery lora [OPTIONS] COMMAND [ARGS]...",
         "lora fold": "ckptsurgery lora fold [OPTIONS] BASE ADAPTER...",
         "lora extract": "ckptsurgery lora extract [OPTIONS] BASE TUNED",
         "lora merge": "ckptsurgery lora merge [OPTIONS] ADAPTER...",
         "lora resize": "ckptsurgery lora resize [OPTIONS] ADAPTER",
         "lora convert": "ckptsurgery lora convert [OPTIONS] ADAPTER"}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", COMMANDS)
def test_usage_names_arguments_without_braces_and_no_argument_is_a_str(cli, monkeypatch, command, width):
    text = help_at(cli, monkeypatch, command, width)
    usage = text.split("Usage:", 1)[1].split("\n\n", 1)[0]
    assert " ".join(usage.split()) == USAGE[command]
    assert "{" not in usage and "<str>" not in text


def test_an_optional_argument_is_in_brackets_and_several_end_with_dots(cli, capsys, monkeypatch):
    from ckptsurgery.cli.common import command_app

    monkeypatch.setenv("COLUMNS", "80")
    tiny = command_app()

    @tiny.command()
    def run(first: Annotated[str, Argument(help="One.")],
            rest: Annotated[Optional[list[str]], Argument(help="Several.")] = None,
            level: Annotated[int, Option("--level", min=0, max=9, help="How much.")] = 3) -> None:
        """Run."""

    from ckptsurgery.cli.typer_app import typer_of

    with pytest.raises(SystemExit):
        typer.main.get_command(typer_of(tiny)).main(["--help"], prog_name="tiny")
    text = capsys.readouterr().out
    assert "Usage: tiny [OPTIONS] FIRST [REST...]" in text
    assert re.search(r"--level\s+<int> \[0<=x<=9\]\s+How much\. \[default: 3\]", text), text


@pytest.mark.parametrize("width", WIDTHS)
def test_the_groups_command_summaries_are_one_paragraph_each(cli, monkeypatch, width):
    """Each summary is the first paragraph of the command's help, its lines filled: a newline in a
    docstring no longer ends a line early ("...; several" / "checkpoints ...")."""
    from ckptsurgery.cli import COMMANDS as NAMES

    lines = panel(help_at(cli, monkeypatch, "", width), "Commands")
    group = click_command("")
    starts = [i for i, line in enumerate(lines) if line.split() and line.split()[0] in NAMES and not line.startswith(" ")]
    assert [lines[i].split()[0] for i in starts] == list(NAMES)
    inner = width - 4
    for name, start, end in zip(NAMES, starts, [*starts[1:], len(lines)]):
        rows = lines[start:end]
        paragraph = " ".join(re.split(r"\n\s*\n", group.get_command(None, name).help.strip())[0].split())
        assert " ".join(" ".join(rows).split()) == f"{name} {paragraph}"
        said = rows[1:] if rows[0] == name else rows  # stacked: the summary under the name
        for line, after in pairwise(said):  # a line ends only where the next word would not fit
            assert len(line.rstrip()) + 1 + len(after.split()[0]) > inner, (name, line, after)
        column = len(said[0]) - len(said[0].lstrip()) if said is not rows else len(rows[0]) - len(rows[0][len(name):].lstrip())
        assert all(len(line) - len(line.lstrip()) == column for line in said[1:]), (name, said)


@pytest.mark.parametrize("command", ["inspect", "merge", "rename", "diff"])
def test_help_is_in_columns_when_wide_and_stacked_when_narrow(cli, monkeypatch, command):
    wide = panel(help_at(cli, monkeypatch, command, 120), "Options")
    assert re.fullmatch(r"--root +KEY +Key of the state dict .*", next(line for line in wide if "--root" in line))
    narrow = help_at(cli, monkeypatch, command, 60 if command in ("merge", "rename") else 40)
    lines = panel(narrow, "Options")
    at = lines.index("--root KEY")
    assert lines[at + 1].startswith("    Key of the state dict")


def test_merge_keeps_its_panels_at_every_width(cli, monkeypatch):
    for width in WIDTHS:
        text = help_at(cli, monkeypatch, "merge", width)
        for title in ("Arguments", "Options", "Output", "Into a template (--into)", "Plain merge",
                      "Merge methods (--method, --average)", "Adapters (--lora)"):
            assert f"╭─ {title} ─" in text
        assert "--density" in "".join(panel(text, "Merge methods (--method, --average)"))
        assert "--density" not in "".join(panel(text, "Into a template (--into)"))


@pytest.mark.parametrize("width", WIDTHS)
def test_types_defaults_and_required_are_shown(cli, monkeypatch, width):
    text = " ".join(help_at(cli, monkeypatch, "convert", width).replace("│", " ").split())
    assert "N [x>=1]" in text and "[default: 120.0]" in text and "extension picks the format. [required]" in text


@pytest.mark.parametrize("width", [40, 60])
@pytest.mark.parametrize("command", LEAVES)
def test_examples_too_long_for_the_terminal_go_on_with_a_backslash_and_still_parse(cli, monkeypatch, command, width):
    text = help_at(cli, monkeypatch, command, width)
    tail = text[text.index("\n Examples:\n") :].splitlines()[2:]
    assert all(len(line) <= width for line in tail)
    # one example a paragraph; a line that ends with " \\" goes on on the next one
    examples = [" ".join(line.strip().removesuffix("\\").strip() for line in block.splitlines())
                for block in "\n".join(tail).strip().split("\n\n")]
    assert 2 <= len(examples) <= 3 and all(e.startswith(f"ckptsurgery {command} ") for e in examples), examples
    assert any(line.endswith(" \\") for line in tail)  # at these widths some example did not fit on a line
    named = len(command.split())
    for example in examples:
        words = shlex.split(example.split(" |")[0].split(" ||")[0])
        with click_command(command).make_context(command, words[1 + named:]) as ctx:
            assert ctx.params


def test_wrap_breaks_a_choice_list_after_a_bar_only_and_folds_only_a_word_wider_than_the_line():
    values = ["<fp32|", "fp16|", "bfloat16|", "half>"]
    choice = [Piece(v, glued=i > 0) for i, v in enumerate(values)]
    lines = ["".join(p.text for p in line) for line in wrap(choice, 12)]
    assert lines == ["<fp32|fp16|", "bfloat16|", "half>"]
    folded = ["".join(p.text for p in line) for line in wrap([Piece("a"), Piece("0123456789")], 6)]
    assert folded == ["a", "012345", "6789"]  # nothing cut: every character is there


def test_every_command_is_a_help_command_and_no_other_class_is_taken():
    from typer.core import TyperCommand

    from ckptsurgery.cli.common import command_app

    assert issubclass(type(click_command("rename")), HelpCommand)  # rename's own class, which takes rules in order
    assert all(isinstance(click_command(name), HelpCommand) for name in LEAVES)
    with pytest.raises(TypeError, match="cls: not a setting of a command"):
        command_app().command(cls=TyperCommand)


def test_a_commands_examples_are_the_end_of_its_docstring_and_no_epilog_is_taken():
    from ckptsurgery.cli.common import command_app
    from ckptsurgery.cli.help import docstring_parts

    assert docstring_parts("Do it.\n\nMore.\n\nExamples:\n    ckptsurgery x a\n    ckptsurgery x b") == (
        "Do it.\n\nMore.", "Examples:\n\nckptsurgery x a\n\nckptsurgery x b")
    assert docstring_parts("Do it; examples: none.") == ("Do it; examples: none.", None)
    convert = click_command("convert")
    assert "Examples" not in convert.help and convert.epilog.startswith("Examples:\n\nckptsurgery convert ")
    with pytest.raises(TypeError, match="docstring"):
        command_app().command(epilog="Examples: ...")


def run_help(*args, env=None, tty=False) -> bytes:
    environ = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "PY_COLORS", "NO_COLOR", "TTY_COMPATIBLE")}
    environ.update({"COLUMNS": "80", "TERM": "xterm-256color", **(env or {})})
    command = [sys.executable, "-c", "from ckptsurgery.cli import main; main()", *args]
    if not tty:
        return subprocess.run(command, env=environ, capture_output=True, check=True).stdout
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(command, env=environ, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the command is done
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait() == 0
    return out


def test_help_is_plain_text_in_a_pipe_and_under_no_color():
    assert b"\x1b[" in run_help("merge", "--help", tty=True)  # a terminal gets colours
    assert b"\x1b[" not in run_help("merge", "--help", env={"NO_COLOR": "1"}, tty=True)
    piped = run_help("merge", "--help")
    assert b"\x1b[" not in piped and b"Usage: ckptsurgery merge [OPTIONS] [SOURCE...]" in piped


PROBE = """
import sys
sys.argv = ["ckptsurgery", *sys.argv[1:]]
from ckptsurgery.cli import main
try:
    main()
except SystemExit:
    pass
sys.stderr.write("\\nRICH " + str(any(m == "rich" or m.startswith("rich.") for m in sys.modules)) + "\\n")
"""


@pytest.mark.parametrize("args, rich", [(["inspect", "{flat}", "--json"], False), (["--version"], False),
                                        (["convert", "{flat}", "-o", "{out}"], False), (["diff", "--help"], True)])
def test_rich_is_imported_to_show_help_only(flat, tmp_path, args, rich):
    args = [str(flat) if a == "{flat}" else str(tmp_path / "o.safetensors") if a == "{out}" else a for a in args]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, check=True)
    assert proc.stderr.rsplit("RICH ", 1)[1].strip() == str(rich), proc.stderr

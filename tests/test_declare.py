"""The command line's own parser (cli/declare.py): a plain command line runs its command without
Typer, with the values Typer would have given; anything else is Typer's to answer.

The `cli` fixture holds the parser to Typer on every command line the suite runs
(conftest.assert_parsed_as_typer_does); these cases are the edges of Click's syntax."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
from conftest import assert_one_error_line, assert_parsed_as_typer_does

from ckptsurgery.cli import COMMANDS, parsed
from ckptsurgery.cli.declare import _spec


def declared_commands():
    for module in COMMANDS.values():
        yield from importlib.import_module(f"ckptsurgery.cli.{module}").app.commands.values()


def test_every_command_is_parsed_without_typer():
    """Each declaration is one the parser reads: none sends all its runs to Typer."""
    assert [c.name for c in declared_commands() if _spec(c) is None] == []
    assert {c.name for c in declared_commands()} >= {"inspect", "merge", "rename", "fold", "extract-lora"}


PARSED = [
    ["inspect", "a.pth", "b.pth", "--keys", "x", "--keys=y", "--tree", "--depth", "2"],
    ["inspect", "a.pth", "--keys", "-weird", "--", "-c.pth"],  # a value taken whatever it looks like; -- ends options
    ["inspect", "-", "--json"],  # "-" is an argument
    ["convert", "a.pth", "-qo", "b.safetensors", "--dtype", "bf16"],  # short options together, the last with its value
    ["convert", "a.pth", "-ob.safetensors", "-o", "c.safetensors", "--force", "--jobs", "2", "-j3"],  # the last wins
    ["convert", "a.pth", "-o", "b.safetensors", "--rank-timeout", "1_0.5", "--metadata", "a=b", "--metadata=c=d"],
    ["merge", "a.pth", "b.pth", "--method", "ties", "--no-normalize", "--density", "0.5", "-o", "m.safetensors"],
    ["merge", "a.pth", "--into", "t.pth", "--on-mismatch", "adapt", "-o", "m.pth", "--names", "hf"],
    ["merge", "--config", "r.yml", "-o", "out/"],  # no source: an optional argument of several, not given
    ["diff", "a.pth", "b.pth", "--atol", "nan", "-q", "--ignore", "*.bias"],
    ["rename", "a.pth", "-o", "b.pth", "--replace", "a", "b", "--strip-prefix=module", "--replace", "-o", "x"],
    ["lora", "fold", "base.pth", "ad1", "ad2", "--scale", "0.5", "-o", "m.safetensors"],
    ["extract-lora", "a.pth", "b.pth", "--rank", "4", "--rank", "q=8", "-o", "ad"],
]


@pytest.mark.parametrize("args", PARSED, ids=lambda a: " ".join(a))
def test_a_plain_command_line_is_parsed_as_typer_parses_it(args):
    assert parsed(args) is not None, args
    assert_parsed_as_typer_does(args)


def test_values_are_converted_to_the_declared_types():
    command, given = parsed(["convert", "a.pth", "-qo", "b.safetensors", "--dtype", "bf16", "-j", "3"])
    assert command.name == "convert" and given["output"] == "b.safetensors" and given["quiet"] is True
    assert given["dtype"].value == "bf16" and given["jobs"] == 3 and isinstance(given["rank_timeout"], float)
    _, given = parsed(["rename", "a.pth", "-o", "b.pth", "--replace", "a", "b", "--strip-prefix=module"])
    assert given["rules"] == [("replace", ["a", "b"]), ("strip", ["module"])]
    _, given = parsed(["merge", "a", "b", "--method", "ties", "--no-normalize", "-o", "m"])
    assert given["normalize"] is False and given["sources"] == ["a", "b"]


LEFT_TO_TYPER = [
    [],
    ["inspect"],  # a required argument missing
    ["inspect", "a.pth", "-h"],
    ["inspect", "a.pth", "--help"],
    ["inspect", "a.pth", "--bogus"],
    ["inspect", "a.pth", "--depth", "0"],  # below its minimum
    ["inspect", "a.pth", "--depth", "two"],
    ["inspect", "a.pth", "--tree=yes"],  # a flag takes no value
    ["inspect", "a.pth", "--keys"],  # a value missing
    ["convert", "a.pth"],  # a required option missing
    ["convert", "a.pth", "-o", "b.pth", "--dtype", "bf17"],  # not a choice
    ["convert", "a.pth", "-xo", "b.pth"],  # an unknown short option
    ["convert", "a.pth", "b.pth", "-o", "c.pth"],  # an argument too many
    ["diff", "a.pth"],
    ["lora"],
    ["lora", "fld", "a", "b", "-o", "c"],
    ["rename", "a.pth", "-o", "b.pth", "--replace", "a"],  # a rule without its second value
    ["inspct", "a.pth"],
    ["--version", "inspect"],
]


@pytest.mark.parametrize("args", LEFT_TO_TYPER, ids=lambda a: " ".join(a) or "nothing")
def test_anything_but_a_plain_command_line_is_left_to_typer(args):
    assert parsed(args) is None


def test_shell_completion_is_left_to_typer(monkeypatch):
    monkeypatch.setenv("_CKPTSURGERY_COMPLETE", "bash_complete")
    assert parsed(["inspect", "a.pth"]) is None


def test_wrong_usage_is_still_typers_one_line(cli):
    assert_one_error_line(cli("convert", "a.pth", "-o", "b.pth", "--dtype", "bf17"), "'bf17' is not one of", code=2)
    assert_one_error_line(cli("inspect", "a.pth", "--depth", "0"), "--depth", code=2)


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path):
    """`ckptsurgery inspect big --json | head -c 100`: exit 1 (as under Typer), nothing on stderr."""
    from safetensors.numpy import save_file
    import numpy as np

    path = tmp_path / "many.safetensors"
    save_file({f"layer.{i}.weight": np.zeros(1, np.float32) for i in range(20000)}, str(path))
    proc = subprocess.Popen([sys.executable, "-c", "from ckptsurgery.cli import main; main()", "inspect", str(path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "0"})
    proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and err == b"", err


def random_command_lines(seed: int, count: int):
    """Command lines made of each command's own option names, spelled every way Click takes them
    (--name value, --name=value, -x value, -xVALUE, clusters, --no-...), values of every kind
    (numbers, choices, words that look like options, empty), arguments, `--` and `-`."""
    import random

    from ckptsurgery.cli.declare import _spec

    rng = random.Random(seed)
    values = ["x", "-x", "--", "-", "", "1", "0", "-1", "2.5", "1_0", "nan", "inf", "bf16", "float16", "gguf", "hf",
              "ties", "slerp", "linear", "adapt", "first", "a=b", "peft", "svd", "--force", "-q"]
    commands = [(c, [next(n for n in COMMANDS if COMMANDS[n] == m)] if not app.group else [app.name, c.name])
                for m in COMMANDS.values() for app in [importlib.import_module(f"ckptsurgery.cli.{m}").app]
                for c in app.commands.values()]
    for _ in range(count):
        command, words = rng.choice(commands)
        spec = _spec(command)
        names = list(spec.options)
        line = list(words)
        for _ in range(rng.randint(0, 9)):
            roll = rng.random()
            name = rng.choice(names)
            kind = spec.options[name]
            if roll < 0.25:
                line.append(rng.choice(["a.pth", "b.pth", "c", "-", "--", "-o"]))
            elif roll < 0.8:
                if kind.flag or rng.random() < 0.1:
                    line.append(name + ("=1" if rng.random() < 0.05 else ""))
                elif name.startswith("--") and rng.random() < 0.3:
                    line.append(f"{name}={rng.choice(values)}")
                elif not name.startswith("--") and rng.random() < 0.3:
                    line.append(name + rng.choice(values))
                else:
                    line += [name, rng.choice(values)]
            elif roll < 0.9:
                shorts = [n[1] for n in names if len(n) == 2]
                if shorts:
                    line.append("-" + "".join(rng.choice(shorts) for _ in range(rng.randint(1, 3))))
            else:
                line.append(rng.choice(values))
        if rng.random() < 0.7 and "-o" in spec.options:
            line += ["-o", "out.safetensors"]
        yield line


def test_random_command_lines_are_parsed_as_typer_parses_them():
    """Thousands of command lines, each checked against Typer wherever the parser takes it; and the
    parser does take a good share of them (it is not simply leaving everything to Typer)."""
    taken = 0
    for args in random_command_lines(seed=18, count=3000):
        assert_parsed_as_typer_does(args)
        taken += parsed(args) is not None
    assert taken > 300, taken

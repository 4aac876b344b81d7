"""The docs say what the code does (issue 18 §5): every command block of docs/cookbook.md, and the
README's runnable examples, run in order in a fresh folder on the files the docs themselves make,
and what each command prints is compared with what the doc shows (the README's examples show
no output: each must exit 0, and what their comments promise — a folded tree, a folder made —
is checked).

docs/cookbook.md is run as a reader would follow it: its ```python snippets (which make
pretrained.pth, new_model.pth, last.pth, ... — seeded and tiny) are executed in that folder, in
order with its command blocks, so no file comes from outside the doc. A command block holds lines
`$ COMMAND` (a trailing backslash continues one; a here-document, `cat > recipe.yml <<'EOF'`, takes
its lines up to EOF), each followed by what it prints (stdout and stderr as a terminal shows them,
in the order written); a line `...` stands for any number of lines. A command must exit 0 unless
the next one is `$ echo $?`, which shows its exit code. The ```make block (the CI rule) is run by
make, twice: the second run has nothing to do.

Only what legitimately varies is masked, the same way in the doc and in the output: byte sizes
(`620 B`, `24.6 KB`), floats with three or more decimals or an exponent (a maximum difference,
an SVD's relative error: they follow the random values and the BLAS), the temporary folder, and
runs of spaces between a table's columns (a masked value changes a column's width). Key names,
shapes, counts, messages, JSON structure and exit codes must match.

README blocks not run, each with its reason (readme_block_not_run, which refuses a block it does
not know): the command synopsis (usage lines, not commands), set-up (`make`, `pip`, `pipx`:
installs from the network) and the torchrun example (several machines). The Library snippet
(Python) is run as written on files the test makes.

`ckptsurgery ...` commands run in-process through the real entry point (`ckptsurgery.cli:main`,
as the `cli` fixture does, but with stdout and stderr in one buffer so their order is kept); a
line with a shell pipe or `||` runs in bash, with `ckptsurgery` being `python -P -m ckptsurgery`
(skipped, with a warning, when a program it pipes into — jq — is not installed)."""

from __future__ import annotations

import difflib
import json
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ckptsurgery.cli import main

ROOT = Path(__file__).resolve().parent.parent
COOKBOOK = ROOT / "docs" / "cookbook.md"
README = ROOT / "README.md"

# ---- reading a doc ------------------------------------------------------------------------------


@dataclass
class Block:
    doc: str         # "docs/cookbook.md"
    lang: str        # the fence's info string: "", "python", "sh", "make"
    line: int        # the line number of the block's first content line
    lines: list[str]
    section: str     # the `## ` heading above it


@dataclass
class Command:
    doc: str
    line: int
    text: str        # the command, continuation lines joined
    expected: list[str] | None = field(default_factory=list)  # None: the doc shows no output


def blocks(path: Path) -> list[Block]:
    doc = str(path.relative_to(ROOT))
    found, section, fence, start, body = [], "", None, 0, []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            elif line.startswith("```"):
                fence, start, body = line[3:].strip(), number + 1, []
        elif line.startswith("```"):
            found.append(Block(doc, fence, start, body, section))
            fence = None
        else:
            body.append(line)
    assert fence is None, f"{doc}: a fence opened at line {start - 1} is never closed"
    return found


HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


def commands(block: Block) -> list[Command]:
    """`$ COMMAND` lines and what follows each, up to the next; trailing blank lines dropped. A
    command with a here-document (`<<'EOF'`) takes the lines up to its end as part of it."""
    found: list[Command] = []
    i = 0
    while i < len(block.lines):
        line = block.lines[i]
        if line.startswith("$ "):
            number, text = block.line + i, line[2:]
            while text.endswith("\\"):
                i += 1
                text = text[:-1].rstrip() + " " + block.lines[i].strip()
            here = HEREDOC.search(text)
            if here:  # `cat > recipe.yml <<'EOF'`: the lines up to EOF are the command's input
                body = []
                while not body or body[-1] != here.group(2):
                    i += 1
                    assert i < len(block.lines), f"{block.doc}:{number}: the here-document never ends"
                    body.append(block.lines[i])
                text = "\n".join([text, *body])
            found.append(Command(block.doc, number, text))
        else:
            assert found or not line.strip(), f"{block.doc}:{block.line + i}: output before any command: {line!r}"
            if found:
                found[-1].expected.append(line)
        i += 1
    for command in found:
        while command.expected and not command.expected[-1].strip():
            command.expected.pop()
    return found


def is_command_block(block: Block) -> bool:
    return block.lang == "" and any(line.startswith("$ ") for line in block.lines)


# ---- comparing ----------------------------------------------------------------------------------

SIZE = re.compile(r"\b\d+(?:\.\d)? [KMGT]?B\b")
FLOAT = re.compile(r"(?<![\w.])-?(?:\d+\.\d{3,}(?:e[-+]?\d+)?|\d+(?:\.\d+)?e[-+]\d+)(?![\w.])")
OMITTED = object()  # a doc line `...`


def mask(line: str, folder: Path | None = None) -> str:
    if folder is not None:
        line = line.replace(f"{folder}{os.sep}", "").replace(str(folder), ".")
    line = FLOAT.sub("<float>", SIZE.sub("<size>", line.rstrip()))
    indent = len(line) - len(line.lstrip(" "))
    return line[:indent] + re.sub(r" {2,}", "  ", line[indent:])


def matches(expected: list, actual: list[str]) -> bool:
    """`expected` (masked lines and OMITTED) against `actual`: OMITTED spans any number of lines."""
    # can[i][j]: expected[i:] matches actual[j:]
    can = [[False] * (len(actual) + 1) for _ in range(len(expected) + 1)]
    can[len(expected)][len(actual)] = True
    for i in range(len(expected) - 1, -1, -1):
        for j in range(len(actual), -1, -1):
            if expected[i] is OMITTED:
                can[i][j] = can[i + 1][j] or (j < len(actual) and can[i][j + 1])
            else:
                can[i][j] = j < len(actual) and expected[i] == actual[j] and can[i + 1][j + 1]
    return can[0][0]


def compare(command: Command, code: int, expected_code: int, output: str, folder: Path) -> str | None:
    """None when the command printed what the doc shows, else a readable report."""
    actual = output.splitlines()
    shown = command.expected or []
    want = [OMITTED if line.strip() == "..." else mask(line) for line in shown]
    ok_output = command.expected is None or matches(want, [mask(line, folder) for line in actual])
    if ok_output and code == expected_code:
        return None
    report = [f"{command.doc}:{command.line}: $ {command.text}"]
    if code != expected_code:
        report.append(f"exit code {code}, the doc shows {expected_code}")
    if not ok_output:
        diff = difflib.unified_diff(shown, [line.replace(f"{folder}{os.sep}", "").rstrip() for line in actual],
                                    f"{command.doc}:{command.line + 1} (what the doc shows)",
                                    "what the command printed", lineterm="", n=max(len(shown), len(actual)))
        report.append("\n".join(diff))
    elif command.expected is None:
        report.append(output.rstrip())
    return "\n".join(report)


# ---- running ------------------------------------------------------------------------------------

def needs_shell(text: str) -> bool:
    """A pipe, `||`, `&&`, a redirection or a variable outside quotes (a `# comment` aside)."""
    bare = re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
    bare = re.sub(r"(^|\s)#.*", "", bare)
    return re.search(r"[|&;<>`$]", bare) is not None


class Runner:
    """Runs a doc's commands in one folder, in order, remembering the last exit code."""

    def __init__(self, folder: Path, monkeypatch):
        self.folder, self.monkeypatch, self.last_code = folder, monkeypatch, 0
        self.bin = folder.parent / f"{folder.name}-bin"
        self.bin.mkdir(exist_ok=True)
        script = self.bin / "ckptsurgery"  # the command, whether or not the console script is installed
        script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -P -m ckptsurgery "$@"\n')
        script.chmod(0o755)
        self.env = {**os.environ, "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        self.env.pop("COLUMNS", None)
        monkeypatch.chdir(folder)
        monkeypatch.delenv("COLUMNS", raising=False)  # tables as a pipe shows them (160 columns)

    def run(self, text: str) -> tuple[int, str]:
        if text.strip() == "echo $?":
            return 0, f"{self.last_code}\n"
        if needs_shell(text):
            done = subprocess.run(["bash", "-o", "pipefail", "-c", text], cwd=self.folder, env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
            self.last_code = done.returncode
            return done.returncode, done.stdout
        words = shlex.split(text, comments=True)
        assert words[0] == "ckptsurgery", text
        buffer = io.StringIO()
        code = 0
        with self.monkeypatch.context() as m:
            m.setattr(sys, "argv", words)
            # Click names the program `python -m pytest.ckptsurgery` when pytest runs as `python -m
            # pytest`: the console script's __main__ has no package, and the name is argv[0]
            m.setattr(sys.modules["__main__"], "__package__", None, raising=False)
            m.setattr(sys, "stdout", buffer)
            m.setattr(sys, "stderr", buffer)
            try:
                main()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        self.last_code = code
        return code, buffer.getvalue()


def missing_program(text: str) -> str | None:
    """A program a shell line pipes into that this machine lacks (jq), else None."""
    first_line = text.split("\n", 1)[0]  # a here-document's lines are input, not programs
    lexer = shlex.shlex(first_line, posix=True, punctuation_chars=True)  # `#` starts a comment
    first = True
    for word in lexer:
        if word in ("|", "||", "&&", ";"):
            first = True
        elif first:
            first = False
            if word not in ("echo", "ckptsurgery") and shutil.which(word) is None:
                return word
    return None


def run_commands(runner: Runner, found: list[Command], failures: list[str]) -> None:
    for i, command in enumerate(found):
        if command.text.strip() == "echo $?":
            continue  # shown with the command before it
        absent = missing_program(command.text)
        if absent:
            warnings.warn(f"{command.doc}:{command.line}: not run, {absent} is not installed: {command.text}")
            continue
        code, output = runner.run(command.text)
        following = found[i + 1] if i + 1 < len(found) else None
        expected_code = 0
        if following is not None and following.text.strip() == "echo $?":
            shown = "".join(following.expected).strip()
            assert shown.isdigit(), f"{following.doc}:{following.line}: `echo $?` shows {shown!r}"
            expected_code = int(shown)
        failure = compare(command, code, expected_code, output, runner.folder)
        if failure:
            failures.append(failure)


# ---- docs/cookbook.md ---------------------------------------------------------------------------


def run_snippet(block: Block, namespace: dict) -> None:
    """A ```python block, in the namespace of those before it; a traceback names the doc's line."""
    code = compile("\n" * (block.line - 1) + "\n".join(block.lines), str(ROOT / block.doc), "exec")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation notices are not the doc's
        exec(code, namespace)


HUB_STAND_IN = "llava-hf/llava-1.5-7b-hf"  # the repository the cookbook's remote section reads


def make_hub_stand_in(folder: Path) -> None:
    """A tiny stand-in of HUB_STAND_IN as the Hub holds it: three safetensors shards and their
    index, LLaVA's key names (a CLIP vision tower, a projector, a Llama), two layers each."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    keys = {"vision_tower.vision_model.embeddings.patch_embedding.weight": (32, 3, 4, 4),
            "vision_tower.vision_model.embeddings.position_embedding.weight": (17, 32)}
    for i in range(2):
        p = f"vision_tower.vision_model.encoder.layers.{i}."
        keys.update({p + f"self_attn.{n}.weight": (32, 32) for n in ("q_proj", "k_proj", "v_proj", "out_proj")})
        keys.update({p + "mlp.fc1.weight": (64, 32), p + "mlp.fc2.weight": (32, 64)})
    keys.update({"multi_modal_projector.linear_1.weight": (48, 32), "multi_modal_projector.linear_2.weight": (48, 48),
                 "language_model.model.embed_tokens.weight": (100, 48)})
    for i in range(2):
        p = f"language_model.model.layers.{i}."
        keys.update({p + f"self_attn.{n}.weight": (48, 48) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        keys.update({p + "mlp.gate_proj.weight": (96, 48), p + "mlp.up_proj.weight": (96, 48),
                     p + "mlp.down_proj.weight": (48, 96)})
    keys.update({"language_model.model.norm.weight": (48,), "language_model.lm_head.weight": (100, 48)})
    repo = folder / HUB_STAND_IN
    repo.mkdir(parents=True)
    names = list(keys)
    weight_map = {}
    for s, part in enumerate((names[:14], names[14:26], names[26:])):
        shard = f"model-{s + 1:05d}-of-00003.safetensors"
        save_file({k: torch.randn(keys[k], generator=g).to(torch.float16) for k in part}, str(repo / shard),
                  metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (repo / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0},
                                                                   "weight_map": weight_map}, indent=2))


@pytest.fixture
def hub_stand_in(tmp_path, monkeypatch):
    """The stand-in, served from 127.0.0.1 (tests/remote_server.py), HF_ENDPOINT pointed there."""
    from remote_server import RangeServer

    make_hub_stand_in(tmp_path / "hub")
    with RangeServer(str(tmp_path / "hub")) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
        yield server


def test_cookbook_runs_as_written(tmp_path, monkeypatch, hub_stand_in):
    """Every block of docs/cookbook.md in order: snippets make the files, commands print what the
    doc shows, the Makefile rule builds once. Its `hf://` commands read a stand-in of the repository
    they name (hub_stand_in)."""
    folder = tmp_path / "cookbook"
    folder.mkdir()
    runner = Runner(folder, monkeypatch)
    namespace: dict = {"__name__": "cookbook"}
    failures: list[str] = []
    skipped_section = None
    ran = 0
    with torch.random.fork_rng():  # the snippets seed torch: the other tests' random state is theirs
        for block in blocks(COOKBOOK):
            if block.section == skipped_section:
                continue
            if block.lang == "python":
                try:
                    run_snippet(block, namespace)
                except ImportError as e:  # transformers, peft: the test extras
                    warnings.warn(f"{block.doc}:{block.line}: section {block.section!r} not run: {e}")
                    skipped_section = block.section
                continue
            if block.lang == "make":
                run_make(block, runner, failures)
                continue
            assert is_command_block(block), f"{block.doc}:{block.line}: a block this test does not know how to run"
            found = commands(block)
            run_commands(runner, found, failures)
            ran += len(found)
    assert ran >= 30, f"only {ran} commands found in {COOKBOOK}"
    if failures:
        pytest.fail("the cookbook's output is not what the commands print:\n\n" + "\n\n".join(failures), pytrace=False)


def run_make(block: Block, runner: Runner, failures: list[str]) -> None:
    """The CI rule: make builds its target; a second make has nothing to do."""
    if shutil.which("make") is None:
        warnings.warn(f"{block.doc}:{block.line}: the Makefile rule is not run: make is not installed")
        return
    (runner.folder / "Makefile").write_text("\n".join(block.lines) + "\n")
    target = block.lines[0].split(":")[0].strip()
    make = lambda: subprocess.run(["make"], cwd=runner.folder, env=runner.env, capture_output=True,  # noqa: E731
                                  text=True, timeout=120)
    first = make()
    if first.returncode != 0 or not (runner.folder / target).exists():
        failures.append(f"{block.doc}:{block.line}: make failed:\n{first.stdout}{first.stderr}")
        return
    second = make()
    if second.returncode != 0 or "up to date" not in second.stdout + second.stderr:
        failures.append(f"{block.doc}:{block.line}: a second make did something:\n{second.stdout}{second.stderr}")


# ---- README.md ----------------------------------------------------------------------------------

LIBRARY = "the Library snippet: run by test_readme_library_snippet_runs"


def readme_block_not_run(block: Block) -> str | None:
    """Why a README block is not run as commands, or None when it is. Its runnable examples are
    plain `ckptsurgery ...` lines without output shown: each must exit 0 (a pipe: every part)."""
    lines = [line for line in block.lines if line.strip() and not line.lstrip().startswith("#")]
    words = {line.split()[0] for line in lines}
    if block.lang == "python":
        assert "from ckptsurgery" in block.lines[0], f"{block.doc}:{block.line}: a second Python block"
        return LIBRARY
    if words & {"make", "pip", "pipx"}:
        return "set-up (make, pip, pipx): installs packages from the network"
    if "torchrun" in words:
        return "torchrun across machines"
    if block.lang == "":
        return "the command synopsis: usage lines (INPUT, PATTERN...), not commands"
    if block.lang == "sh" and words == {"ckptsurgery"}:
        return None
    raise AssertionError(f"{block.doc}:{block.line}: a README block this test does not know (run it or say why not)")


def readme_files(folder: Path) -> None:
    """The files the README's examples name (the README does not make them): tiny and seeded."""
    from safetensors.torch import save_file
    from torch import nn

    torch.manual_seed(0)

    def net(classes=1000):
        layers = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, classes))
        return {k.replace("0.", "conv.", 1).replace("1.", "bn.", 1).replace("3.", "fc.", 1): v
                for k, v in layers.state_dict().items()}

    torch.save(net(), folder / "resnet.pth")
    torch.save(net(), folder / "pretrained.pth")
    torch.save(net(classes=10), folder / "new_model.pth")
    torch.save(net(), folder / "big.pth")
    torch.save(net(), folder / "a.pth")
    torch.save({"module." + k: v for k, v in net().items()}, folder / "ddp.pth")
    model = nn.Linear(4, 2)
    model.weight.grad, model.bias.grad = torch.ones(2, 4), torch.ones(2)
    optimizer = torch.optim.Adam(model.parameters())
    optimizer.step()
    torch.save({"epoch": 3, "state_dict": {"fc." + k: v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, folder / "ckpt.pth")
    save_file({f"layers.{i}.experts.{j}.w{w}.weight": torch.randn(2, 2)
               for i in range(2) for j in range(4) for w in (1, 2)}, str(folder / "moe.safetensors"))
    llama = {f"model.layers.{i}.{name}.weight": torch.randn(2, 2) for i in range(12)  # as save_pretrained names them
             for name in ("self_attn.q_proj", "mlp.up_proj")}
    save_file({"model.embed_tokens.weight": torch.randn(4, 2), **llama, "lm_head.weight": torch.randn(4, 2)},
              str(folder / "llama.safetensors"))
    for name in ("a", "b"):
        save_file({k: v.contiguous() for k, v in net().items()}, str(folder / f"{name}.safetensors"))
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled ... single process"
        dcp.save({"model": net(), "step": 1000}, checkpoint_id=str(folder / "checkpoints" / "step-1000"))


# What the README's comments promise, beyond exit 0: (a part of the command, the check, what it checks)
README_CLAIMS = [
    ("--tree --depth", lambda out, folder: "{0..11}" in out, "repeated layers folded: {0..11}"),
    ("convert ckpt.pth -o model.safetensors", lambda out, folder: "optimizer" in out and "left out" in out,
     "optimizer state reported as left out"),
    ("-o out/model.safetensors", lambda out, folder: (folder / "out" / "model.safetensors").exists(),
     "out/ is made if missing"),
    ("-o merged/", lambda out, folder: (folder / "merged" / "model.safetensors").exists(),
     "merged/model.safetensors written"),
    ("--format dcp", lambda out, folder: (folder / "resume" / ".metadata").exists(), "a DCP folder written"),
]


def test_readme_examples_run(tmp_path, monkeypatch):
    """The README's example blocks, each in order in a fresh folder holding the files they name:
    every command exits 0 (their output is not shown in the README), and what their comments
    promise holds."""
    failures: list[str] = []
    ran, claims = 0, set()
    for number, block in enumerate(blocks(README)):
        if readme_block_not_run(block):  # the Library snippet has a test of its own
            continue
        folder = tmp_path / f"block{number}"
        folder.mkdir()
        readme_files(folder)
        runner = Runner(folder, monkeypatch)
        for i, line in enumerate(block.lines):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            command = Command(block.doc, block.line + i, line, expected=None)
            absent = missing_program(line)
            if absent:
                warnings.warn(f"{block.doc}:{command.line}: not run, {absent} is not installed: {line}")
                continue
            code, output = runner.run(line)
            ran += 1
            failure = compare(command, code, 0, output, folder)
            for part, check, what in README_CLAIMS:
                if part in line:
                    claims.add(part)
                    if not failure and not check(output, folder):
                        failure = f"{block.doc}:{command.line}: $ {line}\nnot true: {what}\n{output}"
            if failure:
                failures.append(failure)
    assert ran >= 10, f"only {ran} README commands found"
    if failures:
        pytest.fail("README examples that fail:\n\n" + "\n\n".join(failures), pytrace=False)
    assert claims == {part for part, _, _ in README_CLAIMS}, "a README example checked here is gone"


def test_every_readme_block_is_run_or_said_why_not():
    kinds = [(block.line, readme_block_not_run(block)) for block in blocks(README)]
    assert sum(reason is None for _, reason in kinds) >= 2, kinds  # the examples and the DCP round trip
    assert sum(reason == LIBRARY for _, reason in kinds) == 1, kinds


def library_files(folder: Path) -> None:
    """The files the README's Library snippet names (it does not make them): tiny and seeded."""
    import json

    from safetensors.torch import save_file

    torch.manual_seed(0)

    def net(classes=10):
        return {"conv.weight": torch.randn(4, 3, 3, 3), "conv.bias": torch.randn(4),
                "fc.weight": torch.randn(classes, 4), "fc.bias": torch.randn(classes)}

    torch.save({"epoch": 3, "state_dict": net()}, folder / "ckpt.pth")
    torch.save(net(1000), folder / "pretrained.pth")
    torch.save(net(10), folder / "new_model.pth")
    for name in ("base", "math", "code"):
        torch.save(net(), folder / f"{name}.pth")
    torch.save({"module." + k: v for k, v in net().items()}, folder / "ddp.pth")
    base = {"fc.weight": torch.randn(32, 32), "fc.bias": torch.randn(32)}
    save_file(base, str(folder / "base.safetensors"))
    save_file({k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}, str(folder / "tuned.safetensors"))
    (folder / "adapter").mkdir()  # a PEFT adapter folder on fc
    (folder / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["fc"]}))
    save_file({"base_model.model.fc.lora_A.weight": torch.randn(2, 32),
               "base_model.model.fc.lora_B.weight": torch.randn(32, 2)},
              str(folder / "adapter" / "adapter_model.safetensors"))


def test_readme_library_snippet_runs(tmp_path, monkeypatch, capsys):
    """The README's Library snippet, as written, in a folder holding the files it names: every
    call returns (the `assert` in it holds), each output is written, and the last report prints."""
    block = next(block for block in blocks(README) if readme_block_not_run(block) == LIBRARY)
    library_files(tmp_path)
    monkeypatch.chdir(tmp_path)
    with torch.random.fork_rng():
        run_snippet(block, {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "plain.pth" in printed, printed  # print(report.renamed, report.to_json()): the rename's
    for written in ("model.safetensors", "ft.pth", "ties.pth", "merged.safetensors", "extracted"):
        assert (tmp_path / written).exists(), written

"""The layout docs/architecture.md draws: cli -> ops -> core / io, arrows pointing down only, no
import cycle (imports inside functions included), one module per operation."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ckptsurgery"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the ckptsurgery modules it imports, anywhere in its body."""
    graph: dict[str, set[str]] = {}
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = graph.setdefault(name, set())
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and ast.unparse(block.test) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:  # annotations only: never imported when running
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("ckptsurgery"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                if not base.startswith("ckptsurgery"):
                    continue
                for alias in node.names:  # `from . import core` imports the module core
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else base)
    for name in graph:
        graph[name].discard(name)
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "package"


def test_arrows_point_down_only():
    allowed = {
        "errors": set(), "kinds": set(), "dtypes": {"errors"}, "core": {"errors", "kinds"},
        "io": {"io", "errors", "dtypes", "kinds"}, "ops": {"ops", "io", "core", "errors", "dtypes", "kinds"},
        "cli": {"cli", "ops", "io", "core", "errors", "dtypes", "kinds", "package"},
        "package": {"io", "errors"}, "__main__": {"cli"},
    }
    wrong = [f"{m} imports {t}" for m, targets in _imports().items() for t in targets
             if _layer(t) not in allowed[_layer(m)]]
    assert not wrong


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    # a package's __init__ re-exporting its modules is not a cycle of behaviour
    cycles = [c for c in cycles if not any(c.startswith(p + " ") for p in ("ckptsurgery.io", "ckptsurgery.ops", "ckptsurgery.cli"))]
    assert not cycles


def test_core_is_pure_key_logic():
    """No I/O, no torch, nothing of ours but errors; sizes and shards are the writer's business."""
    source = (PACKAGE / "core.py").read_text()
    tree = ast.parse(source)
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
    assert not imported & {"torch", "os", "io", "mmap", "pathlib", "safetensors", "json"}
    names = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    assert {"select", "compile_pattern", "plan_rename", "align", "unwrap", "overlap_region"} <= names
    assert not names & {"parse_size", "plan_shards", "fold_runs", "check_key"}


@pytest.mark.parametrize("operation", ["inspect", "convert", "edit", "merge", "diff", "write"])
def test_one_module_or_package_per_operation(operation):
    """Each operation is a module, or a package of modules (merge: one per mode)."""
    assert (PACKAGE / "ops" / f"{operation}.py").is_file() or (PACKAGE / "ops" / operation / "__init__.py").is_file()
    importlib.import_module(f"ckptsurgery.ops.{operation}")


def test_library_entry_points():
    from ckptsurgery import open_checkpoint  # noqa: F401
    from ckptsurgery.ops import (  # noqa: F401
        WriteOptions, convert_checkpoint, diff_checkpoints, drop_keys, extract_lora, filter_keys, fold_adapters,
        inspect_checkpoint, inspect_report, merge_checkpoints, rename_keys, write_checkpoint,
    )

    assert all(callable(f) for f in (convert_checkpoint, diff_checkpoints, merge_checkpoints, inspect_checkpoint,
                                     inspect_report, write_checkpoint, extract_lora, fold_adapters))
    assert not (PACKAGE / "surgery.py").exists() and not (PACKAGE / "tensors.py").exists()


def test_ops_functions_do_not_shadow_their_modules():
    """`ckptsurgery.ops.X` is the module X wherever a module X exists: no exported function
    takes a module's name (importing the module by its full name would then be needed)."""
    import pkgutil

    import ckptsurgery.ops as ops

    modules = {m.name for m in pkgutil.iter_modules(ops.__path__)}
    assert not modules & set(ops.__all__)
    for name in modules & set(vars(ops)):
        assert type(getattr(ops, name)).__name__ == "module", name


def test_ops_functions_are_short_and_modules_small():
    """docs/architecture.md: no function in ops/ over 60 lines or 12 parameters, no module of the
    package over 750 lines — the size at which a file stops being one thing."""
    long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        if source.count("\n") > 750:
            long.append(f"{path.relative_to(PACKAGE)}: {source.count(chr(10))} lines")
        if "ops" not in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or count > 12:
                    long.append(f"{path.relative_to(PACKAGE)}: {node.name} ({lines} lines, {count} parameters)")
    assert not long

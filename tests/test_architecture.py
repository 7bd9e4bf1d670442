"""The import graph the code map promises (docs/architecture.md): layers that import only
downward, no import circle, and the project's own modules imported at module top."""

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "harness"
# Lowest first; a module may import its own layer and the layers below, never one above.
LAYERS = [
    {"checks", "registry", "environment", "interrupts", "records", "uncertainty"},
    {"data"},
    {"models"},
    {"settings", "blocks"},
    {"metrics", "remedy", "finetune"},
    {"prune", "sparse"},
    {"evaluate"},
    {"depth"},  # its searches score by the calibration NLL (SLEB), with evaluate's windows
    {"config", "preflight", "record_entries", "resume", "holding", "tracking"},
    {"run", "export_cli", "collect"},
    {"cli", "__main__"},
]
# The only imports of the project's own modules inside functions: a subcommand imports its own
# module only when it runs (`harness collect` does not import the pruning code), and Hydra's
# sweep-end callback is constructed from the config before a sweep starts.
INNER = {("harness.cli", "harness.run"), ("harness.cli", "harness.collect"), ("harness.cli", "harness.export_cli"),
         ("harness.collect.callbacks", "harness.collect")}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        if "zoo_weights" in path.parts or path.parent.name == "tasks":
            continue
        parts = ["harness", *path.relative_to(ROOT).with_suffix("").parts]
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports() -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """(module -> the project's modules it imports at its top, the (module, imported) pairs inside functions)."""
    top, inner = defaultdict(set), set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness"):
                names = [_resolve(f"{node.module}.{a.name}") for a in node.names]
            elif isinstance(node, ast.Import):
                names = [_resolve(a.name) for a in node.names if a.name.startswith("harness")]
            else:
                continue
            for name in names:
                (inner.add((module, name)) if node.col_offset else top[module].add(name))
    return top, inner


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else module
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_every_module_has_a_layer():
    assert all(_layer(m) is not None for m in MODULES if m != "harness")


def test_imports_run_only_downward():
    top, _ = _imports()
    upward = sorted(f"{m} -> {d}" for m, deps in top.items() for d in deps
                    if m != "harness" and d != "harness" and _layer(d) > _layer(m))
    assert not upward, upward


def test_no_import_circle():
    top, _ = _imports()
    seen, stack, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(top.get(m, ())):
            if d != m and not (m.startswith(d + ".") and d in MODULES and MODULES[d].name == "__init__.py"):
                visit(d)
        stack.pop()

    for m in sorted(MODULES):
        visit(m)
    assert not cycles, cycles


def test_the_projects_modules_are_imported_at_module_top():
    _, inner = _imports()
    assert inner <= INNER, sorted(inner - INNER)

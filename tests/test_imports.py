"""Imports run one way: cli -> pipeline -> stages -> {models, data, ops, runtime, report} ->
{config, io, errors}. A cycle hidden in a function body is still a cycle, so every import
statement of every module counts, wherever it is written."""
import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "namedmask"
KERNELS = REPO / "kernels"   # installed as namedmask.kernels


def _modules() -> dict:
    """{dotted module name: source file} of the package, kernels included."""
    out = {}
    for root, prefix in ((PACKAGE, "namedmask"), (KERNELS, "namedmask.kernels")):
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if root is PACKAGE and rel.parts[0] == "kernels":  # the worktree's symlink to ../kernels
                continue
            parts = [prefix, *rel.with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The package module `name` refers to (its longest known prefix), None outside the package."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def imports_of(module: str) -> set:
    """Package modules imported anywhere in `module` (module level, functions, try blocks)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from a import b`: b may be a submodule (an edge to a.b) or a name in a
            names = [f"{base}.{a.name}" if _target(f"{base}.{a.name}") == f"{base}.{a.name}" else base
                     for a in node.names]
        else:
            continue
        for name in names:
            target = _target(name)
            if target and target != module and target != "namedmask":
                found.add(target)
    return found


def find_cycle(graph: dict) -> list | None:
    """One cycle of `graph` as a list of nodes, or None (iterative DFS)."""
    state = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack, path = [(start, iter(sorted(graph[start])))], [start]
        state[start] = 1
        while stack:
            node, edges = stack[-1]
            for nxt in edges:
                if state.get(nxt) == 1:
                    return path[path.index(nxt):] + [nxt]
                if not state.get(nxt):
                    state[nxt] = 1
                    stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    path.append(nxt)
                    break
            else:
                state[node] = 2
                stack.pop()
                path.pop()
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_import_walker_sees_function_level_imports(tmp_path):
    assert "namedmask.runtime" in imports_of("namedmask.training")
    assert {"namedmask.training", "namedmask.stages.archive"} <= imports_of("namedmask.pipeline")


def test_no_import_cycle_in_the_package():
    graph = {m: imports_of(m) for m in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# Lower layers never import higher ones (a module of layer i imports only layers >= i). Every
# package module belongs to exactly one layer, or to the toy wing.
LAYERS = [("namedmask.cli", "namedmask.cli_base", "namedmask.__main__"),
          ("namedmask.pipeline", "namedmask.commands", "namedmask.api"), ("namedmask.stages",),
          ("namedmask.training",), ("namedmask.evaluation",),   # what stages share: the training loop, scoring
          ("namedmask.report", "namedmask.envinfo"), ("namedmask.models",), ("namedmask.data",),
          ("namedmask.runtime",), ("namedmask.ops",), ("namedmask.kernels", "namedmask._native"),
          ("namedmask.config", "namedmask.configs"), ("namedmask.io",), ("namedmask.errors",)]
# The toy world and its tiny models: a wing beside the layers. It uses the library below the
# stages; only the CLI and the pipeline (and bench/, tests/ outside the package) use it.
WING = "namedmask.toy"
WING_USERS = ("namedmask.cli", "namedmask.__main__", "namedmask.pipeline")


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if _in(module, prefixes):
            return i
    return None


def test_every_module_has_a_place():
    placeless = [m for m in MODULES if m != "namedmask" and _layer(m) is None and not _in(m, (WING,))]
    assert not placeless, placeless


def test_imports_run_one_way():
    upward = [f"{m} -> {t}" for m in MODULES for t in imports_of(m)
              if _layer(m) is not None and _layer(t) is not None and _layer(t) < _layer(m)]
    assert not upward, upward


def test_no_stage_imports_another_stage():
    across = sorted(f"{m} -> {t}" for m in MODULES if _in(m, ("namedmask.stages",))
                    for t in imports_of(m) if _in(t, ("namedmask.stages",)))
    assert not across, across


def test_toy_is_a_wing():
    users = sorted(f"{m} -> {t}" for m in MODULES if not _in(m, (WING, *WING_USERS))
                   for t in imports_of(m) if _in(t, (WING,)))
    assert not users, users
    upward = sorted(f"{m} -> {t}" for m in MODULES if _in(m, (WING,)) for t in imports_of(m)
                    if _layer(t) is not None and _layer(t) < _layer("namedmask.report"))
    assert not upward, upward


def test_kernels_import_no_other_package_module():
    outside = {f"{m} -> {t}" for m in MODULES if m.startswith("namedmask.kernels")
               for t in imports_of(m) if not t.startswith("namedmask.kernels")}
    assert not outside, sorted(outside)


def test_importing_namedmask_is_cheap_and_needs_no_extension():
    """`import namedmask` loads neither torch nor the native extension (the API is lazy)."""
    code = ("import sys, namedmask; assert 'torch' not in sys.modules, 'torch'; "
            "assert 'namedmask._C' not in sys.modules; print(namedmask.__version__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

"""The Ray boundary, as the README's Layout states it, checked on the source (no imports run): nothing in `workloads/`
imports Ray itself (it reaches Ray only through `cluster/`), and the per-worker algorithm modules import neither Ray
nor `cluster/`, not even through the workloads modules they import at module level."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

# The code a Train worker runs between its calls to cluster.train: plain PyTorch, runnable with no Ray installed.
ALGORITHM = ("workloads.finetune.strategy", "workloads.finetune.evaluation", "workloads.finetune.schedule",
             "workloads.align.rl", "workloads.align.estimators", "workloads.align.policy", "workloads.align.rollout",
             "workloads.align.rl_checkpoints", "workloads.data.formats", "workloads.models.loading",
             "workloads.models.lora", "workloads.models.tiny", "workloads.scoring")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module, top_level_only: bool) -> set[str]:
    """Modules named by the file's import statements (module level only: what importing it runs, bar TYPE_CHECKING)."""
    nodes = ast.walk(tree) if not top_level_only else (
        n for stmt in tree.body if not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))
        for n in ast.walk(stmt) if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _workloads() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for p in sorted((REPO / "workloads").rglob("*.py"))}


def test_no_workloads_module_imports_ray_itself():
    offenders = {name: sorted(m for m in _imports(tree, top_level_only=False) if m == "ray" or m.startswith("ray."))
                 for name, tree in _workloads().items()}
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_per_worker_algorithm_imports_neither_ray_nor_cluster():
    modules = _workloads()
    graph = {name: {m for m in _imports(tree, top_level_only=True)
                    if m.split(".")[0] in ("workloads", "cluster", "ray")} for name, tree in modules.items()}
    assert set(ALGORITHM) <= set(graph), set(ALGORITHM) - set(graph)
    for start in ALGORITHM:
        seen, todo, via = set(), [start], {start: start}
        while todo:
            name = todo.pop()
            for target in graph.get(name, ()):
                if target.split(".")[0] in ("cluster", "ray"):
                    raise AssertionError(f"{start} imports {target} at module level (through {via[name]})")
                if target in graph and target not in seen:
                    seen.add(target)
                    via[target] = f"{via[name]} -> {target}"
                    todo.append(target)

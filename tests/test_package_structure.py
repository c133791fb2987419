"""The package's shape: no import circles between its modules (counting imports inside functions too,
since a lazy import only hides a circle), and the reference implementations stay out of training's way."""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "gpt2cu")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def package_imports() -> dict:
    """module -> the set of gpt2cu modules it imports, anywhere in its code."""
    modules = {}
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                modules[module_name(os.path.join(root, name))] = os.path.join(root, name)
    graph = {}
    for mod, path in modules.items():
        is_package = path.endswith("__init__.py")
        base = mod.split(".") if is_package else mod.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom):
                target = (base[:len(base) - node.level + 1] if node.level else []) + \
                         (node.module.split(".") if node.module else [])
                target = ".".join(target)
                for alias in node.names:  # `from . import checkpoint` names a module
                    candidate = f"{target}.{alias.name}"
                    deps.add(candidate if candidate in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[mod] = {d for d in deps if d in modules and d != mod and not mod.startswith(d + ".")}
    return graph


def find_cycle(graph):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circles():
    graph = package_imports()
    assert "gpt2cu.trainer" in graph and "gpt2cu.models.gpt2" in graph
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_training_does_not_import_torch():
    """Only gpt2cu.reference (the tests' and benchmarks' PyTorch models) may import torch."""
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            path = os.path.join(root, name)
            if not name.endswith(".py") or module_name(path).startswith("gpt2cu.reference"):
                continue
            for node in ast.walk(ast.parse(open(path).read())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                assert not any(n.split(".")[0] == "torch" for n in names), path

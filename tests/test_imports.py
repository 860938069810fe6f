"""The package has no import cycles, counting imports inside functions too (a lazy import must be there
for start-up time or an optional dependency, never to dodge a cycle)."""

import ast
from pathlib import Path

import diffbatch

PACKAGE = Path(diffbatch.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every diffbatch module ``path`` imports, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t.startswith("diffbatch")}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # "from .x import name" names a module only when x.name is one; a package import means its __init__
    return {name: {t for t in imports(path) if t in modules and t != name} for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_package_has_no_import_cycles():
    edges = graph()
    # The package root re-exports the public API; its submodules import from it never.
    edges = {k: v - {"diffbatch"} for k, v in edges.items()}
    assert cycles(edges) == []


def test_inference_never_imports_the_shapes_tools():
    # training and evaluation live in a distribution of their own (shapes/); the inference package must run
    # without it, so no module of it, at any depth, imports diffbatch_shapes
    offenders = {module_name(p): sorted(t for t in imports(p) if t.startswith("diffbatch_shapes"))
                 for p in PACKAGE.rglob("*.py")}
    assert {name: found for name, found in offenders.items() if found} == {}
    assert not (PACKAGE / "training").exists() and not (PACKAGE / "evaluation").exists()

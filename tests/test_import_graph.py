"""The package's imports point one way: errors/config -> ... -> cli/train. Any import cycle fails here."""

import ast
from pathlib import Path

import mmfm

ROOT = Path(mmfm.__file__).parent.parent
# installed as mmfm.<name> (setup.cfg package_dir)
PACKAGES = {"mmfm": ROOT / "mmfm", "mmfm.encoders": ROOT / "encoders", "mmfm.heads": ROOT / "heads"}


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            modules[name.removesuffix(".__init__")] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """mmfm modules `name` imports anywhere: at the top, inside functions (lazy imports) and for type checking."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_no_import_cycle_inside_the_package():
    """Lazy and type-checking imports count too: each is a dependency of one module on another."""
    modules = _modules()
    known = set(modules)
    # a package's __init__ importing its own submodules is how packages re-export; it is not a cycle
    graph = {
        name: {m for m in _imports(name, path, known) if not (path.name == "__init__.py" and m.startswith(name + "."))}
        for name, path in modules.items()
    }
    assert {"mmfm.config", "mmfm.backbone"} <= graph["mmfm.model"] and "mmfm.model" in graph["mmfm.loader"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]

"""The shape of the package: no import cycle, nothing imports the daemon from below, and
no function takes more than 8 parameters.

Read from the source with `ast`, so every import counts: at module level, inside a
function, and under `if TYPE_CHECKING:` (a cycle hidden there is still two modules
that cannot be understood, tested or moved one without the other).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# import name -> folder; gc/ is installed as replicator.gc (pyproject's package-dir)
PACKAGES = {"replicator": ROOT / "replicator", "replicator.gc": ROOT / "gc"}

# Entry points sit above the daemon: they are allowed to start it.
DAEMON_USERS = ("replicator.cli", "replicator.commands", "replicator.demo")
# Upward imports into the daemon allowed edge by edge (none today), so a new one fails.
KNOWN_UPWARD: set[tuple[str, str]] = set()

MAX_PARAMETERS = 8
# Functions allowed over the limit (by qualified name); none today.
KNOWN_LONG: set[str] = set()


def modules() -> dict[str, Path]:
    """Every module of the product, by import name."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _ancestors(name: str) -> Iterator[str]:
    parts = name.split(".")
    for n in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:n])


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The product modules `name` imports, anywhere in its source.

    Importing `a.b.c` runs `a/b/__init__.py` too, so the packages on the way count,
    except the importer's own packages (those are always initialised before it)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    own = set(_ancestors(name))
    edges: set[str] = set()
    for target in targets:
        if target not in known:
            continue  # third-party, or a name imported from a module rather than a module
        for module in (target, *_ancestors(target)):
            if module in known and module != name and module not in own:
                edges.add(module)
    return edges


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_every_kind_of_import():
    """Guards the checker itself: a lazy, a TYPE_CHECKING and a relative import count."""
    graph = import_graph()
    assert "replicator.daemon.service" in graph["replicator.commands.run"]  # inside run()
    assert "replicator.registry.client" in graph["replicator.commands.check"]  # inside a def
    assert "replicator.config" in graph["replicator.clients"]  # under TYPE_CHECKING
    assert "replicator.gc.layout" in graph["replicator.gc.storage"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    found = cycles(import_graph())
    assert found == [], "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def _within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_nothing_below_the_daemon_imports_it():
    upward = set()
    for module, targets in import_graph().items():
        if _within(module, ("replicator.daemon", *DAEMON_USERS)):
            continue
        into = {t for t in targets if _within(t, ("replicator.daemon",))}
        # `replicator.daemon` itself is implied by any of its modules: name the module
        upward |= {(module, t) for t in into if not any(o.startswith(t + ".") for o in into)}
    assert upward <= KNOWN_UPWARD, sorted(upward - KNOWN_UPWARD)


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.arguments]]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + node.name, node.args
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def test_no_function_takes_more_than_eight_parameters():
    """Counted without self/cls; *args and **kwargs count one each."""
    long: dict[str, int] = {}
    for name, path in modules().items():
        for qualname, args in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            params = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            params += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
            count = len([p for p in params if p not in ("self", "cls")])
            if count > MAX_PARAMETERS and qualname not in KNOWN_LONG:
                long[f"{name}:{qualname}"] = count
    assert long == {}, long


SQL = re.compile(
    r"\b(SELECT\s.+\sFROM|INSERT\s+(OR\s+\w+\s+)?INTO|UPDATE\s+\w+\s+SET|"
    r"DELETE\s+FROM|CREATE\s+(TABLE|INDEX)|PRAGMA\s|BEGIN\s+IMMEDIATE)\b"
)


def test_no_sql_outside_the_journal_package():
    """Every table is reached through its store in replicator/journal/: one place to read
    for what the journal holds, and one convention (async) for reaching it."""
    found = []
    for name, path in modules().items():
        if name == "replicator.journal" or name.startswith("replicator.journal."):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if SQL.search(node.value):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


def test_digests_are_shortened_in_one_place():
    """`text.short_digest` is the one way to print a short digest (three copies of it and
    inline `[:19]` slices drifted apart once): no other module slices at 19."""
    found = []
    for name, path in modules().items():
        if name == "replicator.text":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Slice) and isinstance(node.upper, ast.Constant):
                if node.upper.value == 19 and node.lower is None:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []

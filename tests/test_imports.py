"""The package's import graph: no circles, counting every import (function-level ones too)."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

from tests.helpers import ROOT

PACKAGE = ROOT / "relay"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def relay_imports(path: Path, modules: set[str]) -> set[str]:
    """The relay modules ``path`` imports anywhere in its body (a package's submodule when
    ``from package import submodule``)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if sub in modules:
                    found.add(sub)
                elif node.module in modules:
                    found.add(node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        # a module's own package __init__ importing it back is how packages work, not a circle
        graph[name] = {m for m in relay_imports(path, set(files))
                       if m != name and not name.startswith(m + ".")}
    return graph


def test_the_import_graph_has_no_circle() -> None:
    """No relay module reaches itself through imports, at module level or inside functions."""
    try:
        order = list(graphlib.TopologicalSorter(import_graph()).static_order())
    except graphlib.CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None
    assert "relay.vocab" in order and "relay.cli" in order


def test_the_shared_vocabulary_and_request_import_nothing_of_the_relay() -> None:
    """relay.vocab, relay.frozen and relay.request are leaves: everything may use them, they
    use nothing (relay.request only relay.frozen's decorator)."""
    graph = import_graph()
    assert graph["relay.vocab"] == set() and graph["relay.frozen"] == set()
    assert graph["relay.request"] == {"relay.frozen"}

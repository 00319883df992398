"""Imports point down only (the developers' guide): the library never imports the analyses or the CLI, the
analyses never import the CLI, and no two modules import each other, directly or around a cycle."""

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGES = ("interp_heal", "analyses")


def _module_name(path: Path) -> str:
    return ".".join(path.with_suffix("").parts).removesuffix(".__init__")


def _project_imports(path: Path) -> set[str]:
    """Every project module `path` imports, at any depth of the file (function-level imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {name for name in names if name.split(".")[0] in (*PACKAGES, "cli")}


def _graph() -> dict[str, set[str]]:
    files = [Path("cli.py"), *(p for package in PACKAGES for p in sorted(Path(package).glob("*.py")))]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _project_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_library_never_imports_the_analyses_or_the_cli():
    for module, imports in _graph().items():
        upward = {m for m in imports if m == "cli" or (module.startswith("interp_heal") and m.startswith("analyses"))}
        assert not upward, f"{module} imports {sorted(upward)}"


def test_the_import_graph_has_no_cycle():
    try:
        TopologicalSorter(_graph()).prepare()
    except CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_the_graph_sees_the_imports_it_checks():
    """Guards the two tests above against passing on an empty graph."""
    graph = _graph()
    assert "interp_heal.collect" in graph["interp_heal.loop"] and "interp_heal.models" in graph["cli"]

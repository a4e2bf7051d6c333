"""No import cycles anywhere in the packages, lazy (function-level) imports included.

`lint-imports` (in `make test`) checks DESIGN.md's layers and cycles between sibling modules; a
package's `__init__` that imports its own children, which import it back, is a cycle between a
parent and a child, which no import-linter contract covers. This checks every module pair.

    .venv/bin/python -m pytest -q tests/test_import_cycles.py
"""
import grimp

PACKAGES = ("edge_runtime", "cloud_service", "split", "devices", "edgefold_proto")


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the modules; the components with more than one module are cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n not in graph.modules:
                continue  # external package
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                component.append(n)
                if n == m:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES)
    assert len(graph.modules) > 100  # the packages were found
    assert strongly_connected(graph) == []


def test_the_check_finds_a_parent_child_cycle():
    graph = grimp.ImportGraph()
    for m in ("pkg", "pkg.base", "pkg.kind", "pkg.other"):
        graph.add_module(m)
    graph.add_import(importer="pkg", imported="pkg.kind")  # a factory in __init__ ...
    graph.add_import(importer="pkg.kind", imported="pkg")  # ... and a kind importing its base from it
    graph.add_import(importer="pkg.other", imported="pkg.base")
    assert strongly_connected(graph) == [["pkg", "pkg.kind"]]

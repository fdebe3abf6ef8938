"""The project's modules import each other without a cycle (issue 24): every import, lazy ones inside
functions included, between the project's own modules (top-level scripts, env/, model/, experiments/)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def module_graph() -> dict[str, set[str]]:
    files = {p: p.relative_to(REPO).with_suffix("").as_posix().replace("/", ".")
             for p in [*REPO.glob("*.py"), *REPO.glob("env/*.py"), *REPO.glob("model/*.py"),
                       *REPO.glob("experiments/*.py")]}
    names = {m.removesuffix(".__init__") for m in files.values()}
    graph = {}
    for path, mod in files.items():
        mod = mod.removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:  # relative: inside a package
                pkg = mod.rsplit(".", node.level)[0] if "." in mod else mod
                base = f"{pkg}.{node.module}" if node.module else pkg
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            # a submodule naming its own parent package (`from env import darkroom` inside env/) is Python's
            # package mechanics, not a dependency: the parent is always imported first
            deps |= {t for t in targets if t in names and t != mod and not mod.startswith(t + ".")}
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycle():
    assert find_cycle(module_graph()) is None


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_outgrows_a_read():
    """Issue 24's sizes: no project module over 500 lines (tests aside), loop.py at most 400 — a module a
    reader takes in at once; one that grows past it is split by concept, not left to sprawl."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=False).stdout.split()
    files = [REPO / f for f in tracked if not f.startswith("tests/")] or [
        p for p in REPO.rglob("*.py") if not {"tests", ".venv"} & set(p.relative_to(REPO).parts)]
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in files if p.is_file()}
    assert sizes and {f: n for f, n in sizes.items() if n > 500} == {}
    assert sizes["loop.py"] <= 400

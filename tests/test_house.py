"""The house: imports run one way, jobs/ -> orchestrator/ -> actors/, with no circles, and no job imports another.

Read with `ast` from the files themselves (function-local imports included), so an arrow hidden inside a function
counts. The exception lists below are empty since the moves of docs/house-plan.md; the test fails on any new one
(and on a listed one that is gone, should an exception ever be granted again).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"jobs": 3, "orchestrator": 2, "actors": 1}  # a package imports only from its own layer or below
JOB_LIBRARIES = ("jobs.common", "jobs.pages")  # modules (and packages) of jobs/ that serve the jobs, no job themselves

# (importer, imported) arrows that break the rule: none left since the moves of docs/house-plan.md, step 2.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_JOB_TO_JOB: set[tuple[str, str]] = set()  # none since the pages and the dataset reader left the jobs
KNOWN_CIRCLES: set[frozenset] = set()  # the raters' circle went with check_image_batch's leaf module


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for package in LAYERS for path in sorted((REPO_ROOT / package).rglob("*.py"))}


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules one file imports, anywhere in it; `from package import name` counts as the module
    `package.name` when that is a module, else as the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                     for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def circles(arrows: dict[str, set[str]]) -> set[frozenset]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], set(), [0]
    for root in arrows:
        if root in index:
            continue
        work = [(root, iter(sorted(arrows[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(arrows.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add(frozenset(component))
    return found


def test_imports_run_only_downward():
    arrows = graph()
    upward = {(a, b) for a, targets in arrows.items() for b in targets if layer(b) > layer(a)}
    assert upward - KNOWN_UPWARD == set(), f"new arrows that run up a layer: {sorted(upward - KNOWN_UPWARD)}"
    assert KNOWN_UPWARD - upward == set(), f"gone, strike them from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - upward)}"


def test_no_job_imports_another_job():
    arrows = graph()
    def library(module: str) -> bool:
        return any(module == name or module.startswith(name + ".") for name in JOB_LIBRARIES)

    job_to_job = {(a, b) for a, targets in arrows.items() if a.startswith("jobs.") for b in targets
                  if b.startswith("jobs.") and not library(a) and not library(b)}
    assert job_to_job - KNOWN_JOB_TO_JOB == set(), f"new: {sorted(job_to_job - KNOWN_JOB_TO_JOB)}"
    assert KNOWN_JOB_TO_JOB - job_to_job == set(), f"gone, strike them: {sorted(KNOWN_JOB_TO_JOB - job_to_job)}"


def test_no_circles():
    found = circles(graph())
    assert found - KNOWN_CIRCLES == set(), f"new circles: {[sorted(c) for c in found - KNOWN_CIRCLES]}"
    assert KNOWN_CIRCLES - found == set(), f"gone, strike them: {[sorted(c) for c in KNOWN_CIRCLES - found]}"


def test_the_checker_sees_an_arrow_inside_a_function_and_a_circle(tmp_path):
    """The reader itself: a function-local import counts, and a two-module circle is found."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from actors.models.seeds import batch_noise\n")
    modules = project_modules()
    assert imports_of(source, modules) == {"actors.models.seeds"}
    assert circles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == {frozenset({"a", "b"})}

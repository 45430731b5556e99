"""The layout says what the architecture is: layers without import circles, a core that names no
task, one folder per task that provides the whole Task interface, and READMEs that match the tree.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer.tasks import Task, task_configs

TRAINER = REPO / "trainer"
# Lower layers never import higher ones; a layer may import itself.
LAYERS = {"errors": 0, "settings": 0, "store": 1, "data": 2, "tasks": 3, "job": 4, "sweep": 5}
APPLICATION = 5  # the entry points and verbs at trainer/'s top level


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(TRAINER.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """Every trainer module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in MODULES}
    return found


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return 0  # the package itself: CONF_DIR
    if parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return APPLICATION


def test_every_import_of_the_project_resolves() -> None:
    """Imports inside functions run late: a moved module would fail only when they run. The
    benchmarks, which no test runs, are checked too."""
    broken = []
    benchmarks = {f"benchmarks.{p.stem}": p for p in sorted((REPO / "benchmarks").glob("*.py"))}
    for name, path in {**MODULES, **benchmarks}.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.module or "").startswith(
                ("trainer", "budgets", "evaluation")
            ):
                continue
            try:
                module = importlib.import_module(node.module)
            except ImportError:
                broken.append(f"{name}: {node.module}")
                continue
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if not hasattr(module, alias.name) and submodule not in MODULES:
                    broken.append(f"{name}: {submodule}")
    assert not broken, broken


def test_no_import_circles() -> None:
    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(GRAPH[start])
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo += GRAPH[current]
        return False

    circles = sorted(a for a in GRAPH for b in GRAPH[a] if reaches(b, a))
    assert not circles, f"modules on an import circle: {circles}"


def test_each_layer_imports_only_the_layers_below() -> None:
    wrong = [
        f"{module} imports {imported}"
        for module, imported_set in GRAPH.items()
        for imported in imported_set
        if layer(imported) > layer(module)
    ]
    assert not wrong, wrong


def test_no_module_outside_tasks_names_a_task() -> None:
    names = re.compile("|".join(task_configs()))
    named = [
        f"{path.relative_to(REPO)}:{number}"
        for path in MODULES.values()
        if "tasks" not in path.relative_to(TRAINER).parts
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if names.search(line)
    ]
    assert not named, f"task names outside trainer/tasks/: {named}"


@pytest.mark.parametrize("task", sorted(task_configs()))
def test_each_task_is_one_folder_providing_the_whole_interface(task: str) -> None:
    implementation = importlib.import_module(f"trainer.tasks.{task}.task").TASK
    required = [name for name, _ in inspect.getmembers(Task, inspect.isfunction)]
    assert len(required) >= 14
    missing = [name for name in required if not callable(getattr(implementation, name, None))]
    assert not missing, f"{task} lacks {missing}"
    assert (REPO / "conf" / "task_model" / task / "default.yaml").is_file()


def packages() -> list[Path]:
    return sorted(p.parent for p in TRAINER.rglob("__init__.py"))


@pytest.mark.parametrize("package", packages(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_package_readme_lists_exactly_its_modules(package: Path) -> None:
    readme = (package / "README.md").read_text()
    listed = set(re.findall(r"^\| `([\w]+\.py)`", readme, flags=re.MULTILINE))
    listed |= {
        name
        for cell in re.findall(r"^\| ([^|]*`[\w]+\.py`[^|]*) \|", readme, flags=re.MULTILINE)
        for name in re.findall(r"`([\w]+\.py)`", cell)
    }
    listed.discard("__init__.py")
    modules = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    assert listed == modules, f"README lists {sorted(listed)}, the folder has {sorted(modules)}"
    subpackages = {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
    for name in subpackages:
        assert f"`{name}/`" in readme or f"`{name}`" in readme, f"{name}/ missing from the README"


def test_the_readme_module_map_matches_the_tree() -> None:
    text = (REPO / "README.md").read_text()
    first_cells = re.findall(r"^\| (`[^|]*`) \|", text, flags=re.MULTILINE)
    mapped = {name for cell in first_cells for name in re.findall(r"`([\w/]+)/`", cell)}
    for entry in mapped:
        assert (REPO / entry).is_dir(), f"README maps {entry}, which is not a folder"
    # Hidden folders are tools' (pytest's cache writes a README.md of its own).
    top = {
        p.name
        for p in REPO.iterdir()
        if p.is_dir() and not p.name.startswith(".") and (p / "README.md").is_file()
    }
    assert top <= {entry.split("/")[0] for entry in mapped}
    for package in packages():
        relative = str(package.relative_to(REPO))
        if relative.count("/") <= 2:  # trainer/, its packages and the task folders
            assert relative in mapped, f"{relative}/ is missing from the README's module map"

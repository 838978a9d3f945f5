"""House rules (DESIGN.md §1), checked on the source with `ast`:

- `lrkit.training` and `lrkit.inference` never import each other;
- no import cycle anywhere in `lrkit/` (imports inside functions count);
- no module imports another module's private names;
- the launchable scripts in `train/` and `infer/` hold no logic (no definitions but `main`).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"training": "lrkit.inference", "inference": "lrkit.training"}
IMPORT_FUNCTIONS = {"import_module", "__import__"}


def module_name(path: Path, root: Path = ROOT) -> str:
    """`lrkit/training/a.py` -> `lrkit.training.a`; `lrkit/training/__init__.py` -> `lrkit.training`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) for every module `source` imports, relative imports resolved against `module`.

    `from a import b` yields both `a` and `a.b` (b may be a submodule). String arguments of
    `importlib.import_module(...)` / `__import__(...)` count too.
    """
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 > len(parts):
                    raise ValueError(f"{module}: relative import beyond the top-level package (line {node.lineno})")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in IMPORT_FUNCTIONS and node.args and isinstance(node.args[0], ast.Constant):
                if isinstance(node.args[0].value, str):
                    found.append((node.lineno, node.args[0].value))
    return found


def forbidden_imports(source: str, module: str, forbidden: str, is_package: bool = False) -> list[str]:
    """`line: module` for each import of `forbidden` (or anything under it) in `source`."""
    return [
        f"{line}: {name}"
        for line, name in imported_modules(source, module, is_package)
        if name == forbidden or name.startswith(forbidden + ".")
    ]


def script_definitions(source: str) -> list[str]:
    """`line: name` of every function or class defined in a script, other than `main`."""
    bad = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            bad.append(f"{node.lineno}: class {node.name}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "main":
            bad.append(f"{node.lineno}: def {node.name}")
    return bad


def python_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------ the checker


@pytest.mark.parametrize(
    "source",
    [
        "import lrkit.inference",
        "import lrkit.inference.retouch as r",
        "import os, lrkit.inference.layout",
        "from lrkit import inference",
        "from lrkit import masks, inference as inf",
        "from lrkit.inference import retouch",
        "from lrkit.inference.retouch import Retoucher",
        "from ..inference import retouch",
        "from .. import inference",
        "from ..inference.retouch import *",
        "def f():\n    from lrkit.inference import x\n",
        "if TYPE_CHECKING:\n    from lrkit.inference import Pipeline\n",
        "import importlib\nm = importlib.import_module('lrkit.inference.retouch')",
        "m = __import__('lrkit.inference')",
    ],
)
def test_checker_detects_forbidden_imports(source):
    assert forbidden_imports(source, "lrkit.training.module", "lrkit.inference"), source


def test_checker_resolves_relative_imports_inside_a_package():
    # In lrkit/training/__init__.py, `.` is lrkit.training itself; in lrkit/training/sub/x.py, `...` is lrkit.
    assert forbidden_imports("from ..inference import x", "lrkit.training", "lrkit.inference", is_package=True)
    assert forbidden_imports("from ...inference import x", "lrkit.training.sub.x", "lrkit.inference")
    assert not forbidden_imports("from .inference import x", "lrkit.training.module", "lrkit.inference")


@pytest.mark.parametrize(
    "source",
    [
        "import lrkit.concept",
        "from lrkit import concept, models, attention, masks",
        "from lrkit.training import methods",
        "from . import inference_utils",  # lrkit.training.inference_utils: a sibling, not lrkit.inference
        "from .inference import x",  # lrkit.training.inference: not lrkit.inference
        "import lrkit.inference_tools",  # a different package that merely shares the prefix
        "x = 'lrkit.inference'",
    ],
)
def test_checker_allows_the_shared_core(source):
    assert forbidden_imports(source, "lrkit.training.module", "lrkit.inference") == [], source


def test_script_checker_detects_definitions():
    source = (
        "import argparse\n"
        "def helper():\n    pass\n"
        "class Config:\n    pass\n"
        "def main():\n    def inner():\n        pass\n"
        "async def run():\n    pass\n"
    )
    assert sorted(script_definitions(source)) == ["2: def helper", "4: class Config", "7: def inner", "9: def run"]
    assert script_definitions("from lrkit.cli import main\n\nif __name__ == '__main__':\n    main()\n") == []
    assert script_definitions("import sys\n\ndef main():\n    return 0\n") == []


def boundary_violations(root: Path, side: str, forbidden: str | None = None) -> list[str]:
    """`file:line: module` for each import of the other side (or `forbidden`) in `root/lrkit/<side>`."""
    violations = []
    for path in python_files(root / "lrkit" / side):
        source = path.read_text(encoding="utf-8")
        hits = forbidden_imports(source, module_name(path, root), forbidden or FORBIDDEN[side],
                                 is_package=path.name == "__init__.py")
        violations += [f"{path.relative_to(root)}:{hit}" for hit in hits]
    return violations


def script_violations(root: Path, folder: str) -> list[str]:
    """`file:line: def name` for each definition other than `main` in `root/<folder>/*.py`."""
    violations = []
    for path in python_files(root / folder):
        violations += [f"{path.relative_to(root)}:{d}" for d in script_definitions(path.read_text(encoding="utf-8"))]
    return violations


def test_project_checks_find_violations_in_a_synthetic_tree(tmp_path):
    files = {
        "lrkit/training/__init__.py": "from .module import Module\n",
        "lrkit/training/module.py": "from lrkit import concept\n",
        "lrkit/training/methods/lora.py": "from ...inference.retouch import swap\n",
        "lrkit/inference/pipeline.py": "import lrkit.training.export\n",
        "train/train.py": "from lrkit.cli import main\n\ndef parse():\n    pass\n",
        "infer/generate.py": "def main():\n    pass\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert boundary_violations(tmp_path, "training") == ["lrkit/training/methods/lora.py:1: lrkit.inference.retouch",
                                                         "lrkit/training/methods/lora.py:1: lrkit.inference.retouch.swap"]
    assert boundary_violations(tmp_path, "inference") == ["lrkit/inference/pipeline.py:1: lrkit.training.export"]
    assert script_violations(tmp_path, "train") == ["train/train.py:3: def parse"]
    assert script_violations(tmp_path, "infer") == []


# ----------------------------------------------------------------------------------- the project


@pytest.mark.parametrize("side", sorted(FORBIDDEN))
def test_training_and_inference_never_import_each_other(side):
    violations = boundary_violations(ROOT, side)
    assert violations == [], f"lrkit.{side} must not import {FORBIDDEN[side]}: {violations}"


@pytest.mark.parametrize("forbidden", ["lrkit.training", "lrkit.inference"])
def test_the_toy_world_depends_on_neither_side(forbidden):
    """The toy world is part of the shared core: both sides and the benches use it."""
    assert boundary_violations(ROOT, "toyworld", forbidden) == []


@pytest.mark.parametrize("folder", ["train", "infer"])
def test_scripts_hold_no_logic(folder):
    violations = script_violations(ROOT, folder)
    assert violations == [], f"scripts in {folder}/ must only parse and call (define nothing but main): {violations}"


def import_graph(root: Path) -> dict[str, set[str]]:
    """lrkit module -> the lrkit modules it imports (module level or inside functions), each import resolved to
    the deepest module that exists (`from lrkit.a import b` is lrkit.a.b when b is a module, else lrkit.a)."""
    modules = {module_name(p, root): p for p in python_files(root / "lrkit")}
    graph = {}
    for module, path in modules.items():
        by_line: dict[int, list[str]] = {}
        for line, name in imported_modules(path.read_text(encoding="utf-8"), module, path.name == "__init__.py"):
            by_line.setdefault(line, []).append(name)
        targets = set()
        for names in by_line.values():
            for name in names:
                if any(other in modules and other.rpartition(".")[0] == name for other in names):
                    continue  # `from package import submodule`: the edge goes to the submodule
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def private_imports(root: Path) -> list[str]:
    """`file:line: module._name` for each private name (one leading underscore) a module takes from another
    lrkit module: `from lrkit.x import _y`, or `x._y` on a name bound to an imported lrkit module."""
    found = []
    for path in python_files(root / "lrkit"):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = dict(imported_modules(ast.unparse(node), module, path.name == "__init__.py"))[node.lineno] \
                    if node.level else node.module
                if not (target or "").startswith("lrkit"):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                        found.append(f"{path.relative_to(root)}:{node.lineno}: {target}.{alias.name}")
                    aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("lrkit"):
                        aliases[alias.asname or alias.name.split(".")[0]] = alias.asname and alias.name or "lrkit"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_cycle_and_private_checks_find_violations_in_a_synthetic_tree(tmp_path):
    files = {
        "lrkit/__init__.py": "from lrkit.version import v\n",
        "lrkit/version.py": "v = 1\n",
        "lrkit/inference/__init__.py": "from lrkit.inference.pipeline import Pipeline\n",
        "lrkit/inference/pipeline.py": "def f():\n    from lrkit.inference.dual import g\n",
        "lrkit/inference/dual.py": "from lrkit.inference.pipeline import _reference\nimport lrkit.masks as m\nm._helper()\n",
        "lrkit/masks.py": "from . import version\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["lrkit.masks"] == {"lrkit.version"} and graph["lrkit"] == {"lrkit.version"}
    assert import_cycles(graph) == [["lrkit.inference.dual", "lrkit.inference.pipeline"]]
    assert private_imports(tmp_path) == ["lrkit/inference/dual.py:1: lrkit.inference.pipeline._reference",
                                         "lrkit/inference/dual.py:3: m._helper"]


def test_no_import_cycles_in_lrkit():
    cycles = import_cycles(import_graph(ROOT))
    assert cycles == [], f"modules that import each other (directly or around a loop): {cycles}"


def test_no_module_takes_another_modules_private_names():
    found = private_imports(ROOT)
    assert found == [], f"private names used across modules (make them public or move the code): {found}"


def test_module_name_mapping():
    assert module_name(ROOT / "lrkit" / "training" / "module.py") == "lrkit.training.module"
    assert module_name(ROOT / "lrkit" / "training" / "__init__.py") == "lrkit.training"

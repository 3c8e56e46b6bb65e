"""The package's shape, as a newcomer reads it: subpackages by concept, imports that point one
way, torch and Ray where they belong, public names named, no reaching into private ones, short
functions."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

PACKAGE = ROOT / "seglabel"

# What each unit of the package may import of the others (besides itself): the layers of the
# data flow, core ← storage ← {inputs, engine, outputs} ← job; outputs ← {formats, evaluation,
# preview}. Inputs, engine and outputs do not import each other; nothing imports the job but
# the CLI, the bench and the package's public names (loaded when first used); nothing imports
# the CLI but the two ways in (``python -m seglabel``, the cluster's entry point).
ALLOWED = {
    "core": set(),
    "storage": {"core"},
    "inputs": {"core", "storage"},
    "engine": {"core", "storage"},
    "outputs": {"core", "storage"},
    "formats": {"core", "storage", "outputs"},
    # eval scores COCO results as the COCO export writes them, and lists a truth folder as a
    # job lists its input.
    "evaluation": {"core", "storage", "inputs", "outputs", "formats"},
    "preview": {"core", "storage", "inputs", "outputs"},
    "job": {"core", "storage", "inputs", "engine", "outputs"},
    "bench": {"core", "storage", "inputs", "engine", "outputs", "job"},
    "cli": {"core", "storage", "inputs", "engine", "outputs", "job", "formats", "evaluation", "preview",
            "bench"},
    "__init__": {"core", "engine", "job"},
    "__main__": {"cli"},
    "jobs_entry": {"cli"},
}
# Third-party packages confined to some units: Ray to the job, torch and transformers to the
# engine (the bench measures both); the core imports no storage library either.
CONFINED = {
    "ray": {"job", "bench"},
    "torch": {"engine", "bench"},
    "transformers": {"engine", "bench"},
    "fsspec": {"storage", "inputs", "engine", "outputs", "job", "formats", "evaluation", "preview", "bench",
               "cli"},
}
TOP_LEVEL_MAX_FILES = 8


def unit_of(path: Path) -> str:
    """The unit a file of the package belongs to: its subpackage, or its module's name."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, at any depth (a function's lazy
    import counts: it is loaded all the same), relative imports resolved."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    package = ".".join(rel if path.name == "__init__.py" else rel[:-1]).removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.append((node.lineno, base))
            # `from seglabel import job` imports the subpackage job.
            if base == "seglabel":
                found += [(node.lineno, f"seglabel.{alias.name}") for alias in node.names]
    return found


def violations(path: Path, source: str | None = None) -> list[str]:
    """The imports of one file that break the dependency rule or a confinement."""
    unit, out = unit_of(path), []
    for line, name in imported(path, source):
        parts = name.split(".")
        where = f"{path.relative_to(ROOT)}:{line}"
        if parts[0] == "seglabel" and len(parts) > 1:
            other = parts[1]
            if other != unit and other not in ALLOWED[unit]:
                out.append(f"{where} ({unit}) imports seglabel.{other}")
        elif parts[0] in CONFINED and unit not in CONFINED[parts[0]]:
            out.append(f"{where} ({unit}) imports {parts[0]}")
    return out


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_top_level_reads_as_the_data_flow():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= TOP_LEVEL_MAX_FILES, top
    units = {unit_of(p) for p in package_files()}
    assert units == set(ALLOWED), units ^ set(ALLOWED)  # a new unit gets a place in the rule


def test_the_tests_mirror_the_package():
    """A folder of tests per subpackage (a test module per unit under it); at the top only the
    tests of the repository as a whole and of the package's top-level modules."""
    subpackages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    folders = {p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    # tests/data: files the tests read (KubeRay's CRDs), no tests.
    assert not list((ROOT / "tests" / "data").rglob("*.py"))
    assert folders - {"data"} <= subpackages, folders - subpackages
    top = {p.stem.removeprefix("test_") for p in (ROOT / "tests").glob("test_*.py")}
    assert top <= {"readme", "infra", "layout"} | {p.stem for p in PACKAGE.glob("*.py")}, top


def test_imports_point_one_way_and_ray_and_torch_stay_home():
    assert [v for path in package_files() for v in violations(path)] == []
    # The settings depend on nothing but the errors they raise.
    own = {name for _, name in imported(PACKAGE / "core" / "config.py") if name.startswith("seglabel")}
    assert own == {"seglabel.core.errors"}, own


@pytest.mark.parametrize("unit, source, expected", [
    ("core", "import ray", "imports ray"),
    ("core", "import fsspec", "imports fsspec"),
    ("outputs", "from ..inputs.fetch import fetch", "imports seglabel.inputs"),
    ("inputs", "from ..outputs import store", "imports seglabel.outputs"),
    ("engine", "def f():\n    from ..job.plan import plan_work", "imports seglabel.job"),
    ("formats", "import torch", "imports torch"),
    ("storage", "from seglabel import cli", "imports seglabel.cli"),
    ("job", "from transformers import AutoModel", "imports transformers"),
])
def test_the_rule_catches_a_forbidden_import(unit, source, expected):
    """The checker itself: each forbidden import, dropped into a module of ``unit``, is found
    (at any depth, relative or absolute)."""
    path = PACKAGE / unit / "anything.py"
    found = violations(path, source)
    assert len(found) == 1 and found[0].endswith(expected), found
    assert violations(path, "import numpy\nfrom . import sibling") == []


def test_each_subpackage_names_its_public_surface():
    """Each subpackage's ``__init__`` has an ``__all__`` whose every name resolves, and the
    package's own public names keep working."""
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        name = f"seglabel.{init.parent.name}"
        module = importlib.import_module(name)
        assert getattr(module, "__all__", None), f"{name} has no __all__"
        for public in module.__all__:
            assert getattr(module, public) is not None, f"{name}.{public}"
        if init.parent.name in ("cli", "bench"):
            continue  # these import their modules at once: a name is bound after its module
        # A lazy name is looked up only while the package has no attribute of that name, and
        # importing a module gives it one: a public name spelled as one of the package's
        # modules would change meaning with import order.
        modules = {p.stem for p in init.parent.glob("*.py")}
        assert not set(module.__all__) & modules, f"{name}: {set(module.__all__) & modules}"
    import seglabel

    assert set(seglabel.__all__) >= {"run", "label", "Segmenter", "Prediction", "Segment", "JobConfig",
                                     "EngineConfig", "Resolution", "SeglabelError", "Summary", "__version__"}
    for public in seglabel.__all__:
        assert getattr(seglabel, public) is not None, public


def test_importing_a_subpackage_loads_none_of_its_heavy_modules():
    """``import seglabel.engine`` or ``.job`` loads neither torch nor Ray: the driver reads a
    checkpoint's config through the engine, and the CLI starts through the package."""
    code = ("import sys, seglabel, seglabel.engine, seglabel.job, seglabel.core, seglabel.outputs\n"
            "from seglabel.engine.checkpoint import inspect_checkpoint\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_help_does_not_load_torch_or_ray():
    code = ("import sys; from seglabel.cli import main; main(['--help'])\n"
            "print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr
    assert "usage: seglabel" in done.stdout


# The shape the code keeps (issue 23): limits a newcomer can read by.
PIPELINE_MAX_LINES = 350
FUNCTION_MAX_LINES = 80
FUNCTION_MAX_PARAMETERS = 8


def _private_imports(path: Path) -> list[str]:
    """``from seglabel… import _name`` and ``module._name`` of a seglabel module imported as
    ``module``: another module's private names."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    modules, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("seglabel")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
                else:
                    modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    # A test that exercises a private helper on purpose says so on the line.
    return [f for f in found if "private" not in lines[int(f.split(":")[1].split()[0]) - 1]]


def test_no_module_or_test_reaches_into_another_modules_private_names():
    paths = [*package_files(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    assert [f for p in paths for f in _private_imports(p)] == []


def test_the_driver_reads_in_one_screen_and_no_function_is_long_without_a_reason():
    """pipeline.py stays short; a function over the limits carries a comment right above its
    ``def`` (or decorators) saying why it is one piece."""
    assert len((PACKAGE / "job" / "pipeline.py").read_text().splitlines()) < PIPELINE_MAX_LINES
    long = []
    for path in package_files():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            count = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
            count += bool(args.vararg) + bool(args.kwarg)
            count -= bool(args.args and args.args[0].arg in ("self", "cls"))
            size = node.end_lineno - node.lineno + 1
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            if (size > FUNCTION_MAX_LINES or count > FUNCTION_MAX_PARAMETERS) and not (
                    lines[first - 2].strip().startswith("#")):
                long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {size} lines, {count} args")
    assert long == []


def test_every_package_the_code_imports_is_declared():
    """Issue 35: storage imported yarl, which pyproject.toml did not declare (it came with
    aiohttp, until it would not). Every third-party module seglabel/ imports, at any depth,
    belongs to a distribution named in the project's dependencies."""
    import importlib.metadata
    import re

    import tomllib

    declared = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    owners = importlib.metadata.packages_distributions()
    missing = {}
    for path in package_files():
        for _, name in imported(path):
            top = name.split(".")[0]
            if not top or top in sys.stdlib_module_names or top == "seglabel":
                continue
            dists = {d.lower().replace("_", "-") for d in owners.get(top, [top])}
            if not dists & declared:
                missing.setdefault(top, str(path.relative_to(ROOT)))
    assert missing == {}, missing

"""The package's structure rules, checked on the source: rooms by concern
(sub-packages) that state their public surface, the layering in the
contract file .importlinter (checked by import-linter), no private names
used across modules (the package, its scripts, tests and benchmarks), the
brute-force references kept out of the shipped package, modules small
enough to read, and the modules that must work without Caffe or the
engines never importing them."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / "python"
PACKAGE = PYTHON / "dlbhc"
ROOMS = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
MODULES = sorted(".".join(p.relative_to(PYTHON).with_suffix("").parts)
                 for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")
# every Python file whose imports of dlbhc are checked for private names
CHECKED_FILES = sorted([*PACKAGE.rglob("*.py"), *(PYTHON / "dlbhc_testing").rglob("*.py"),
                        *PYTHON.glob("*.py"), *(ROOT / "tests").glob("*.py"),
                        *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "data").glob("*.py"),
                        *(ROOT / "prototxt").glob("*.py")])
MAX_MODULE_LINES = 500
# Search, evaluation, storage and data acquisition are tested and benchmarked
# without a Caffe build: importing them must not import caffe.
CAFFE_FREE = ("dlbhc.search", "dlbhc.store", "dlbhc.images", "dlbhc.files", "dlbhc.errors",
              "dlbhc.progress", "dlbhc.report", "dlbhc.serving", "dlbhc.scale",
              "dlbhc.datasets.cifar10", "dlbhc.datasets.collection", "dlbhc.datasets.photos",
              "dlbhc.nets.torch_legacy", "dlbhc_testing")


def lint_imports(folder, pythonpath=None):
    """Run import-linter in `folder` (the contract file .importlinter there)
    on the packages found in `pythonpath` (default: the folder itself)."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(pythonpath or folder))
    return subprocess.run([str(exe) if exe.exists() else "lint-imports", "--no-cache"],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def _module_of(path):
    """Dotted module name of a file of the package, or None elsewhere."""
    try:
        rel = path.resolve().relative_to(PYTHON)
    except ValueError:
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _target(node, current, is_package):
    """The absolute dlbhc/dlbhc_testing module an import node names, or None."""
    if not isinstance(node, ast.ImportFrom):
        return None
    if node.level:
        if current is None:
            return None
        base = current.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))
    if node.module and node.module.split(".")[0] in ("dlbhc", "dlbhc_testing"):
        return node.module
    return None


def private_uses(path):
    """(line, text) of every private name of a dlbhc module used in `path`:
    imported by name, or reached as an attribute of an imported module."""
    tree = ast.parse(path.read_text())
    current = _module_of(path)
    is_package = path.name == "__init__.py"
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in ("dlbhc", "dlbhc_testing"):
                    aliases.add((alias.asname or alias.name).split(".")[0])
            continue
        target = _target(node, current, is_package)
        if target is None:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append((node.lineno, f"from {target} import {alias.name}"))
            elif f"{target}.{alias.name}" in MODULES or f"{target}.{alias.name}" in \
                    {f"dlbhc.{r}" for r in ROOMS}:
                aliases.add(alias.asname or alias.name)     # a module, by name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append((node.lineno, f"{ast.unparse(node)}"))
    return found


@pytest.mark.parametrize("path", CHECKED_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_name_of_another_module_is_used(path):
    assert private_uses(path) == []


def test_the_private_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dlbhc.search.index import _concat_ranges\n"
                   "from dlbhc.search import codes\ncodes._x\n"
                   "import dlbhc.store.database\ndlbhc.store.database._y\n")
    assert [text for _, text in private_uses(bad)] == [
        "from dlbhc.search.index import _concat_ranges", "codes._x", "dlbhc.store.database._y"]


def test_the_rooms_keep_the_layering_of_the_contract_file():
    out = lint_imports(ROOT, pythonpath=PYTHON)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_the_contract_check_can_fail(tmp_path):
    """A copy of the package with a search module importing serving and
    Caffe breaks two contracts; the linter says which import did."""
    shutil.copytree(PACKAGE, tmp_path / "dlbhc")
    shutil.copytree(PYTHON / "dlbhc_testing", tmp_path / "dlbhc_testing")
    shutil.copy(ROOT / ".importlinter", tmp_path)
    with open(tmp_path / "dlbhc" / "search" / "pca.py", "a") as f:
        f.write("\n\ndef _bad():\n    import caffe\n    from ..serving import retrieval\n")
    out = lint_imports(tmp_path)
    assert out.returncode != 0
    assert "dlbhc.search.pca -> dlbhc.serving.retrieval" in out.stdout
    assert "dlbhc.search.pca -> caffe" in out.stdout


def test_every_room_states_its_public_surface():
    import importlib
    assert len(ROOMS) >= 6
    for room in ROOMS:
        module = importlib.import_module(f"dlbhc.{room}")
        assert module.__doc__ and len(module.__doc__.split()) > 20, f"dlbhc.{room} has no docstring"
        assert getattr(module, "__all__", None), f"dlbhc/{room}/__init__.py lists no public names"
        missing = [name for name in module.__all__ if not hasattr(module, name)]
        assert missing == [], f"dlbhc.{room}"
        # every module of the room is named in its docstring
        own = [m.rsplit(".", 1)[1] for m in MODULES if m.startswith(f"dlbhc.{room}.")]
        unlisted = [m for m in own if m not in module.__doc__]
        assert unlisted == [], f"dlbhc.{room}'s docstring does not name {unlisted}"


def test_the_package_states_its_public_surface():
    import dlbhc
    assert dlbhc.__all__, "dlbhc/__init__.py must list its public names"
    missing = [name for name in dlbhc.__all__ if not hasattr(dlbhc, name)]
    assert missing == []
    # every room and top-level module is named in the package docstring
    top = [m.split(".")[1] for m in MODULES if m.count(".") == 1]
    unlisted = [m for m in ROOMS + top if m not in dlbhc.__doc__]
    assert unlisted == []


@pytest.mark.parametrize("path", sorted(PYTHON.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_is_longer_than_the_limit(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)}: {lines} lines"


def test_caffe_free_modules_do_not_import_caffe():
    code = ("import sys, pkgutil, importlib; sys.path.insert(0, %r)\n" % str(PYTHON)
            + "names = %r\n" % (CAFFE_FREE,)
            + "for name in names:\n"
            + "    m = importlib.import_module(name)\n"
            + "    for info in pkgutil.walk_packages(getattr(m, '__path__', []), name + '.'):\n"
            + "        importlib.import_module(info.name)\n"
            + "import dlbhc\n"
            + "bad = [m for m in sys.modules if m == 'caffe' or m.startswith('caffe.')]\n"
            + "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_engines_are_imported_only_when_used():
    """Ray and Milvus stay behind their adapters: importing the package, the
    scripts' modules and the adapters themselves loads neither engine, so
    the single-machine path runs without them installed."""
    code = ("import sys; sys.path.insert(0, %r)\n" % str(PYTHON)
            + "import dlbhc, dlbhc.scale.ray_extract, dlbhc.scale.milvus_index\n"
            + "import dlbhc.serving.retrieval, dlbhc.extraction.pipeline, dlbhc.store\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('ray', 'pymilvus', 'milvus')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

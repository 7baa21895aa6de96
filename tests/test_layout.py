"""The package's structure rules, checked on the source: one module per
concern with a stated public surface, no private names used across
modules, brute-force references kept out of production code, and the
modules that must work without Caffe never importing it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "dlbhc"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
# Search, evaluation, storage and data acquisition are tested and benchmarked
# without a Caffe build: importing them must not import caffe.
CAFFE_FREE = ("codes", "native", "pca", "index", "pivots", "rerank", "metrics", "reference", "store",
              "images", "files", "cifar10", "errors", "progress", "retrieval", "milvus_index",
              "service", "webapp", "torch_legacy", "collection", "photos")


def _dlbhc_module(node, current):
    """The dlbhc module an import node refers to, or None."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1:
            return node.module or ""          # "" = the package itself
        if node.module and node.module.startswith("dlbhc"):
            return node.module.removeprefix("dlbhc").lstrip(".")
    return None


def _private_uses(path):
    """(line, text) of every private name of another dlbhc module used here."""
    tree = ast.parse(path.read_text())
    found, aliases = [], set()
    for node in ast.walk(tree):
        target = _dlbhc_module(node, path.stem)
        if target is None:
            continue
        for alias in node.names:
            if target == "" and alias.name in MODULES:
                aliases.add(alias.asname or alias.name)   # from . import index
            elif alias.name.startswith("_"):
                found.append((node.lineno, f"from {target or '.'} import {alias.name}"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


@pytest.mark.parametrize("name", MODULES)
def test_no_private_name_of_another_module_is_used(name):
    assert _private_uses(PACKAGE / f"{name}.py") == []


def test_the_private_name_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .index import _concat_ranges\nfrom . import codes\ncodes._x\n")
    assert [text for _, text in _private_uses(bad)] == ["from index import _concat_ranges",
                                                        "codes._x"]


@pytest.mark.parametrize("name", [m for m in MODULES if m != "reference"])
def test_production_modules_never_import_the_reference(name):
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    for node in ast.walk(tree):
        target = _dlbhc_module(node, name)
        if target == "reference" or (target == "" and any(a.name == "reference"
                                                          for a in node.names)):
            pytest.fail(f"{name}.py line {node.lineno} imports the test-only reference module")


def test_caffe_free_modules_do_not_import_caffe():
    code = ("import sys; sys.path.insert(0, %r)\n" % str(ROOT / "python")
            + "".join(f"import dlbhc.{m}\n" for m in CAFFE_FREE)
            + "import dlbhc\n"
            + "bad = [m for m in sys.modules if m == 'caffe' or m.startswith('caffe.')]\n"
            + "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_package_states_its_public_surface():
    import dlbhc
    assert dlbhc.__all__, "dlbhc/__init__.py must list its public names"
    missing = [name for name in dlbhc.__all__ if not hasattr(dlbhc, name)]
    assert missing == []
    # every module is named in the package docstring's table
    unlisted = [m for m in MODULES if f"\n    {m} " not in dlbhc.__doc__]
    assert unlisted == []


def _docstring_order():
    import dlbhc
    names = []
    for line in dlbhc.__doc__.splitlines():
        parts = line.split()
        if line.startswith("    ") and not line.startswith("     ") and parts \
                and parts[0] in MODULES:
            names.append(parts[0])
    return names


def test_modules_import_only_modules_above_them_in_the_stated_order():
    order = _docstring_order()
    assert sorted(order) == MODULES
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for name in MODULES:
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        for node in ast.walk(tree):
            target = _dlbhc_module(node, name)
            if target is None:
                continue
            targets = [a.name for a in node.names] if target == "" else [target.split(".")[0]]
            upward += [(name, t) for t in targets if t in rank and rank[t] >= rank[name]]
    assert upward == []


def test_engines_are_imported_only_when_used():
    """Ray and Milvus stay behind their adapters: importing the package, the
    scripts' modules and the adapters themselves loads neither engine, so
    the single-machine path runs without them installed."""
    code = ("import sys; sys.path.insert(0, %r)\n" % str(ROOT / "python")
            + "import dlbhc, dlbhc.scale.ray_extract, dlbhc.scale.milvus_index, dlbhc.serving.retrieval\n"
            + "import dlbhc.extraction.pipeline, dlbhc.store.database\n"
            + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
              "('ray', 'pymilvus', 'milvus')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

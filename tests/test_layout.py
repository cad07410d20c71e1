"""The layout the architecture page draws, checked: the import contracts in pyproject.toml hold
(import-linter), a fedlodrop module is imported inside a function only where the one list below
says why (a heavy dependency on a path that must stay light), every public class, function and
method says what it is for, registries refuse a second class under a taken name, and the docs
site builds with --strict (a broken link or reference fails)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fedlodrop"

# The one list of imports of fedlodrop modules inside functions: the module (or package prefix)
# that may, and why. Anything else imports at the top of its file.
LAZY = {
    "fedlodrop.cli": "each command imports its own library code: `fedlodrop --help` and the planner's and "
                     "Flower's set-up commands start without torch",
    "fedlodrop.flower.app": "torch: a ClientApp answering a discovery query or SecAgg+'s set-up stages starts "
                            "in about a second without it",
    "fedlodrop.run.experiment": "the planner (scipy, cvxpy): only a run with a system or a plan needs it",
    "fedlodrop.run.meter": "the planner (scipy, cvxpy): only a run with a system needs it",
    "fedlodrop.run.settings": "the planner (scipy, cvxpy): only a config that names a system reads it",
    "fedlodrop.run.systems": "the planner (scipy, cvxpy): only a run with a system needs it",
    "fedlodrop.model.pooling": "transformers: the mean-pooled model class is imported when a model is built",
    "fedlodrop.planning.methods": "cvxpy: only the solver asked for is imported",
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts)


def function_level_imports() -> list[tuple[str, str, int]]:
    """(module, imported fedlodrop module, line) of every import inside a function in src."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                names = ([sub.module] if isinstance(sub, ast.ImportFrom) and sub.module
                         else [a.name for a in sub.names] if isinstance(sub, ast.Import) else [])
                found += [(_module(path), n, sub.lineno) for n in names if n.startswith("fedlodrop")]
    return sorted(set(found))


def test_the_import_contracts_hold():
    """`lint-imports` on the contracts in pyproject.toml: the layers, and the planner beside them."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (pip install -e '.[test]')"
    res = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0 and "0 broken" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
    assert res.stdout.count("KEPT") == 3


def test_a_fedlodrop_module_is_imported_in_a_function_only_where_the_list_says_why():
    unlisted = [f"{mod}:{line} imports {what}" for mod, what, line in function_level_imports()
                if not any(mod == key or mod.startswith(key + ".") for key in LAZY)]
    assert not unlisted, "import these at the top of the file, or add the module to LAZY with the reason:\n" + \
        "\n".join(unlisted)
    assert all(why for why in LAZY.values())


def test_every_public_class_function_and_method_has_a_docstring():
    """Modules, public classes, public functions and public methods (a dataclass's to_json and
    from_json excepted: the class says what its JSON is)."""
    missing = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        mod = _module(path)
        if not ast.get_docstring(tree):
            missing.append(mod)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                if not ast.get_docstring(node):
                    missing.append(f"{mod}.{node.name}")
                if isinstance(node, ast.ClassDef):
                    missing += [f"{mod}.{node.name}.{sub.name}" for sub in node.body
                                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef))
                                and not sub.name.startswith("_") and sub.name not in ("to_json", "from_json")
                                and not ast.get_docstring(sub)]
    assert not missing, "no docstring:\n" + "\n".join(missing)


def test_a_registry_refuses_a_second_class_under_a_taken_name():
    from fedlodrop.lora.aggregation import RULES, AggregationRule
    from fedlodrop.lora.variants import VARIANTS, DropoutVariant
    from fedlodrop.run.settings import registry_names

    for registry, base, taken in ((RULES, AggregationRule, "fedex"), (VARIANTS, DropoutVariant, "update")):
        before = registry.names()
        impostor = type("Impostor", (base,), {"name": taken})
        with pytest.raises(ValueError, match=f"{registry.key} '{taken}' is registered already"):
            registry.register(impostor)
        assert registry.names() == before and registry[taken] is not impostor
        assert registry_names(registry.key) == before


@pytest.mark.slow  # MkDocs renders every page and the API reference from the docstrings
def test_the_docs_site_builds_strictly(tmp_path):
    exe = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert exe, "mkdocs is not installed (pip install -e '.[test]')"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about MkDocs 2, not ours
    res = subprocess.run([exe, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    # the reference is rendered from the docstrings: every module it names has its section
    wanted = re.findall(r"^::: (fedlodrop[\w.]*)$", (ROOT / "docs" / "reference" / "index.md").read_text(), flags=re.M)
    html = (tmp_path / "site" / "reference" / "index.html").read_text()
    assert wanted and not [m for m in wanted if f'id="{m}"' not in html]
    assert "A run folder: its config, task, round records, checkpoints" in html  # RunFolder's docstring

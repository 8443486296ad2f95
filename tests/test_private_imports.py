"""A module's `_private` names are its own: no file of the package, its scripts or its dashboards imports one
from another saekit module. What two modules share gets a public name and a docstring saying why it is shared
(the last such imports were renamed: topk.batch_topk, Bootstrap.replicate_weights, report_text.fmt_value,
description_length.check_precisions, cli.analysis.int_list)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def private_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, "module.name") of every `from saekit... import _name` (dunder names and `as _alias` of a public
    name are fine: the alias is the importer's own private name)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "saekit":
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_the_scan_catches_a_private_import():
    src = "from saekit.sae.topk import TopKSAE, _helper\nfrom saekit.x import y as _y\nfrom saekit import __version__\n"
    assert private_imports(ast.parse(src)) == [(1, "saekit.sae.topk._helper")]


def test_no_module_imports_another_modules_private_names():
    files = [f for d in ("saekit", "scripts", "dashboards") for f in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 100  # the scan found the package, whatever the cwd
    found = {str(f.relative_to(ROOT)): hits for f in files if (hits := private_imports(ast.parse(f.read_text())))}
    assert found == {}

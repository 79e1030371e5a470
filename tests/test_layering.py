"""Import layering of polyprune/: no module imports a private name (``_x``) of another module.

A private name is the module's own business: whoever needs it should get a public name in the
module where it belongs. Parsed with ``ast``, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "polyprune"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def private_imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """``module.name`` for each private name ``path`` imports from another polyprune module."""
    here = module_name(path, package)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("polyprune") or node.module == here:
                continue
            found += [
                f"{node.module}.{a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
    return found


def test_the_parser_sees_a_private_import_of_another_module_only(tmp_path):
    fake = tmp_path / "polyprune" / "x.py"
    fake.parent.mkdir()
    fake.write_text("from polyprune.models import _dtype, load_model\nfrom polyprune.x import _y\n")
    assert private_imports(fake, fake.parent) == ["polyprune.models._dtype"]


def test_no_module_imports_a_private_name_of_another():
    offenders = {
        str(p.relative_to(PACKAGE.parent)): names
        for p in sorted(PACKAGE.rglob("*.py"))
        if (names := private_imports(p))
    }
    assert offenders == {}

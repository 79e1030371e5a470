"""Import layering of polyprune/ (docs/design.md): no module imports a layer above its own, and
no module imports a private name (``_x``) of another module.

A private name is the module's own business: whoever needs it should get a public name in the
module where it belongs. An upward import turns the layers into a tangle: a change in ``cli``
could then break ``models``. Parsed with ``ast``, so nothing is imported; imports inside
functions count like those at module level (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "polyprune"

# Bottom up. A module may import its own layer and those below, never one above. A name covers
# the module and everything under it; the most specific name decides (``polyprune`` itself is
# only the package's ``__init__``: its version and lazy re-exports).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "ground",
        (
            "polyprune",
            "polyprune.errors",
            "polyprune.checks",
            "polyprune.locks",
            "polyprune.outputs",
        ),
    ),
    ("kernels", ("polyprune.kernels",)),
    ("data", ("polyprune.data",)),
    (
        "models",
        ("polyprune.models", "polyprune.weights", "polyprune.gguf", "polyprune.gptq_format"),
    ),
    ("compress", ("polyprune.compress",)),
    ("analysis", ("polyprune.analysis",)),
    ("api", ("polyprune.api",)),
    ("eval", ("polyprune.eval",)),
    ("cli", ("polyprune.cli", "polyprune.cli_commands", "polyprune.cli_mixes")),
)


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    """Index in LAYERS of the most specific name covering ``module``; None if none does."""
    best, best_len = None, -1
    for i, (_, names) in enumerate(LAYERS):
        for name in names:
            covers = module.startswith(name + ".") and name != "polyprune"
            if (module == name or covers) and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def submodule(module: str, name: str, package: Path) -> str:
    """``module.name`` if that is a module of the package, else ``module``."""
    path = package.parent.joinpath(*f"{module}.{name}".split("."))
    return f"{module}.{name}" if path.with_suffix(".py").is_file() or path.is_dir() else module


def imported_modules(path: Path, package: Path) -> list[tuple[int, str]]:
    """(line, module) of every polyprune import in ``path``, at any depth, relative resolved."""
    here = module_name(path, package)
    pkg = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # from ..x import y: relative to this module's package
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                module = ".".join([*base, module] if module else base)
            # ``from polyprune import api`` imports the module polyprune.api
            found += [(node.lineno, submodule(module, a.name, package)) for a in node.names]
    ours = [(line, m) for line, m in found if m == "polyprune" or m.startswith("polyprune.")]
    return list(dict.fromkeys(ours))  # ``from x import a, b``: one entry


def upward_imports(path: Path, package: Path = PACKAGE) -> list[str]:
    """``file:line module imports higher (its layer above this one's)`` for each upward import."""
    here = module_name(path, package)
    own = layer_of(here)
    where = path.relative_to(package.parent)
    return [
        f"{where}:{line} {here} ({LAYERS[own][0]}) imports {module} ({LAYERS[up][0]})"
        for line, module in imported_modules(path, package)
        if (up := layer_of(module)) is not None and own is not None and up > own
    ]


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


def test_the_parser_sees_upward_imports_at_module_and_function_level(tmp_path):
    fake = tmp_path / "polyprune" / "models.py"
    fake.parent.mkdir()
    for below_or_above in ("weights.py", "api.py"):
        (fake.parent / below_or_above).touch()
    fake.write_text(
        "from polyprune.compress.gptq_format import load_gptq_state\n"
        "import polyprune.errors\n"
        "from polyprune import __version__, weights\n"
        "def load():\n"
        "    from polyprune.cli import main\n"
        "    from . import api\n"
    )
    assert upward_imports(fake, fake.parent) == [
        "polyprune/models.py:1 polyprune.models (models) imports polyprune.compress.gptq_format "
        "(compress)",
        "polyprune/models.py:5 polyprune.models (models) imports polyprune.cli (cli)",
        "polyprune/models.py:6 polyprune.models (models) imports polyprune.api (api)",
    ]


def test_every_module_has_a_layer():
    """A new top-level module must be placed in LAYERS (and docs/design.md) to be checked."""
    unplaced = [
        module_name(p, PACKAGE)
        for p in sorted(PACKAGE.rglob("*.py"))
        if layer_of(module_name(p, PACKAGE)) is None
    ]
    assert unplaced == []


def test_no_module_imports_a_higher_layer():
    offenders = [line for p in sorted(PACKAGE.rglob("*.py")) for line in upward_imports(p)]
    assert not offenders, "imports of a higher layer:\n" + "\n".join(offenders)

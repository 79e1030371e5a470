"""The method registry is the one list of methods: the CLI, the API, the matrix config and the
engine accept exactly its names, and it imports without torch."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polyprune.api import prune, quantize
from polyprune.cli import build_parser, main
from polyprune.compress.methods import method_names, methods
from polyprune.errors import InputError
from polyprune.eval.matrix import MatrixConfig

ROOT = Path(__file__).resolve().parents[1]
NOT_A_METHOD = "obc"
KINDS = ("prune", "quantize")


def method_choices(command: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return set(next(a for a in sub._actions if a.dest == "method").choices)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_method_choices_are_exactly_the_registrys(kind):
    assert method_choices(kind) == set(method_names(kind))
    assert NOT_A_METHOD not in method_choices(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_rejects_a_method_outside_the_registry(kind, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([kind, "--model", "demo", "--method", NOT_A_METHOD, "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'obc'" in capsys.readouterr().err


@pytest.mark.parametrize("name", [s.name for s in methods() if not s.data_free])
def test_cli_asks_every_calibrating_method_for_calib(name, tmp_path, capsys):
    kind = next(s.kind for s in methods() if s.name == name)
    rc = main([kind, "--model", "demo", "--method", name, "--out", str(tmp_path / "o"), "-q"])
    assert rc == 2
    assert f"--method {name} needs --calib MIX" in capsys.readouterr().err


# A bad format fails after the method check and before any work: reaching it means the API
# accepted the method.
API = {"prune": prune, "quantize": quantize}


@pytest.mark.parametrize("kind", KINDS)
def test_api_accepts_exactly_the_registrys_methods(kind):
    for name in method_names(kind):
        with pytest.raises(InputError, match="unknown format"):
            API[kind]("demo", method=name, format="bogus")
    other = [n for n in method_names() if n not in method_names(kind)] + [NOT_A_METHOD]
    for name in other:
        with pytest.raises(InputError, match=f"unknown method '{name}'"):
            API[kind]("demo", method=name, format="bogus")


def demo_config(tmp_path: Path, methods_: list[str]) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    return raw | {"workdir": str(tmp_path / "m"), "methods": methods_}


def test_matrix_config_accepts_every_registered_method(tmp_path):
    cfg = MatrixConfig.from_dict(demo_config(tmp_path, list(method_names())))
    assert cfg.methods == method_names()


def test_matrix_config_rejects_a_method_outside_the_registry(tmp_path):
    with pytest.raises(InputError, match="config: unknown method 'obc'; allowed: magnitude"):
        MatrixConfig.from_dict(demo_config(tmp_path, ["wanda", NOT_A_METHOD]))


@pytest.mark.parametrize("name", method_names())
def test_the_engine_finds_every_registered_solver(name):
    from polyprune.compress.engine import engine_method

    spec = next(s for s in methods() if s.name == name)
    method = engine_method(name)
    assert callable(method.solve)
    assert (method.stat, method.stacked) == (spec.statistic, spec.stacked)


def test_the_registry_imports_without_torch():
    code = (
        "import sys, polyprune.compress.methods as m; "
        "assert m.method_names(); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Bad values: one line on stderr naming the value, exit code 2, before any weights are read.

Most cases run in-process (``main([...])``, imports paid once); a few run as real subprocesses
to check what a user's terminal gets: no traceback, exactly one line.
"""

import json
import logging
import subprocess
import sys

import pytest
import torch
import transformers

import polyprune.api
import polyprune.models
from polyprune.cli import main
from polyprune.data.mix import CalibrationMix
from polyprune.data.sources import get_source
from polyprune.errors import InputError
from polyprune.models import DEMO_MODEL_DIR, load_tokenizer
from tests.test_matrix import write_config

LONG_MIX = "de" * 60_000  # 120,000 characters, no comma: one bad part


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        return e.code


@pytest.fixture
def forbid_loading(monkeypatch):
    """Any attempt to read weights fails the test: bad values must be refused first."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad value was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(polyprune.api, "load_model", refuse)
    monkeypatch.setattr(polyprune.api, "compress_checkpoint", refuse)
    monkeypatch.setattr(polyprune.models, "load_model", refuse)


def _one_error_line(err: str, command: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"polyprune {command}: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


PRUNE = ["prune", "--model", "demo", "--method", "sparsegpt", "--calib", "de", "--nsamples", "4",
         "--seqlen", "16"]  # fmt: skip
QUANT = ["quantize", "--model", "demo", "--method", "gptq", "--calib", "de", "--nsamples", "4",
         "--seqlen", "16"]  # fmt: skip
EVAL = ["eval", "--model", "demo", "--langs", "de", "--tasks", "nextsent", "--limit", "2"]
ANALYZE = ["analyze", "--dense", "demo", "--compressed", "missing-run", "--langs", "de,en"]


@pytest.mark.parametrize(
    "args, message",
    [
        (PRUNE + ["--device", "foo"], "unknown device 'foo'; allowed: cpu, cuda, cuda:N"),
        (PRUNE + ["--device", "meta"], "unknown device 'meta'"),
        (
            ["prune", "--model", "demo", "--method", "magnitude", "--device", "foo"],
            "unknown device 'foo'",
        ),  # fmt: skip
        (QUANT + ["--device", "foo"], "unknown device 'foo'"),
        (
            ["quantize", "--model", "demo", "--method", "rtn", "--device", "meta"],
            "unknown device 'meta'",
        ),  # fmt: skip
        (PRUNE + ["--seed", "-1"], "seed -1 must be an integer in [0, 4294967295]"),
        (PRUNE + ["--seed", str(2**64)], f"seed {2**64} must be an integer"),
        (PRUNE + ["--percdamp", "inf"], "percdamp must be a finite number > 0, got inf"),
        (QUANT + ["--percdamp", "nan"], "percdamp must be a finite number > 0, got nan"),
        (PRUNE + ["--max-shard-size", "0"], "max shard size '0' is out of range"),
        (PRUNE + ["--max-shard-size", "99999999999999999999999TB"], "is out of range"),
        (PRUNE + ["--max-shard-size", "9" * 400 + "GB"], "(402 characters) is out of range"),
        (PRUNE[:-1] + ["1"], "seqlen must be an integer >= 2, got 1"),
        (QUANT[:-1] + ["1"], "seqlen must be an integer >= 2, got 1"),
        (EVAL + ["--device", "foo"], "unknown device 'foo'"),
        (EVAL + ["--dtype", "foo"], "unknown dtype 'foo'; allowed: auto, float32, float16"),
        (PRUNE + ["--dtype", "fp8", "--no-stream"], "unknown dtype 'fp8'"),
        (ANALYZE + ["--dtype", "half"], "unknown dtype 'half'"),
        (EVAL + ["--num-fewshot", "-1"], "num_fewshot must be >= 0, got -1"),
        (ANALYZE + ["--device", "meta"], "unknown device 'meta'"),
        (["data", "show", "de", "--seed", "-5"], "seed -5 must be an integer"),
        (["data", "show", "de", "--seqlen", "1"], "seqlen must be an integer >= 2, got 1"),
        (
            ["data", "show", "de", "--model", "demo", "--seqlen", "100000"],
            "seqlen 100000 is above the model's maximum positions (512)",
        ),  # fmt: skip
    ],
)
def test_bad_value_is_one_line_exit_2_before_loading(
    tmp_path, capsys, forbid_loading, args, message
):
    out = tmp_path / ("out.json" if args[0] == "eval" else "out")
    if args[0] != "data":
        args = [*args, "--out", out]
    assert cli(*args) == 2
    line = _one_error_line(capsys.readouterr().err, args[0])
    assert message in line
    assert not out.exists()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seeds": [0, -1]}, "config: seed -1 must be an integer in [0, 4294967295]"),
        ({"store": "../outside.sqlite"}, "config: store '../outside.sqlite' is outside workdir"),
        ({"store": "/tmp/polyprune-elsewhere.sqlite"}, "is outside workdir"),
        ({"device": "meta"}, "unknown device 'meta'"),
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ],
)
def test_bad_matrix_value_is_one_line_exit_2(tmp_path, capsys, changes, message):
    cfg = write_config(tmp_path, **changes)
    assert cli("matrix", cfg, "--dry-run") == 2
    assert message in _one_error_line(capsys.readouterr().err, "matrix")
    assert not (tmp_path / "outside.sqlite").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_matrix_naming_a_gpu_reads_on_a_cpu_machine_and_refuses_to_run_there(tmp_path, capsys):
    """A Ray matrix may name cuda for its workers: a login node without a GPU can still list
    it (--dry-run); only running it locally needs the GPU."""
    cfg = write_config(tmp_path, device="cuda")
    assert cli("matrix", cfg, "--dry-run") == 0
    capsys.readouterr()
    assert cli("matrix", cfg) == 2
    assert "torch sees no CUDA device" in _one_error_line(capsys.readouterr().err, "matrix")


def test_analyze_seqlen_above_the_models_positions_is_refused(tmp_path, capsys, forbid_loading):
    run = tmp_path / "run"  # a run's manifest and config are all analyze reads before loading
    run.mkdir()
    (run / "config.json").write_bytes((DEMO_MODEL_DIR / "config.json").read_bytes())
    manifest = {"method": "magnitude", "kind": "prune", "calibration": None,
                "settings": {"sparsity": 0.5, "pattern": "unstructured"}}  # fmt: skip
    (run / "polyprune.json").write_text(json.dumps(manifest))
    args = ["analyze", "--dense", "demo", "--compressed", run, "--langs", "de,en", "--metrics",
            "snr", "--nsamples", "2", "--seqlen", "1024", "--out", tmp_path / "r"]  # fmt: skip
    assert cli(*args) == 2
    line = _one_error_line(capsys.readouterr().err, "analyze")
    assert "--seqlen 1024 is above the model's maximum positions (512)" in line


def test_a_long_value_is_cut_in_the_error_line(tmp_path, capsys):
    assert cli(*PRUNE[:6], LONG_MIX, "--out", tmp_path / "out") == 2
    line = _one_error_line(capsys.readouterr().err, "prune")
    assert "(120000 characters)" in line and len(line) < 300


def test_a_long_invalid_choice_is_cut_in_the_argparse_error(tmp_path, capsys):
    bad = "obs" + "x" * 5000
    assert cli("prune", "--model", "demo", "--method", bad, "--out", tmp_path / "o") == 2
    line = capsys.readouterr().err.strip()
    assert "invalid choice" in line and "(5003 characters)" in line and len(line) < 400


@pytest.mark.parametrize(
    "spec, counts",
    [
        ("de:1e308,en:1e308", {"de": 64, "en": 64}),
        ("de:1e307", {"de": 128}),
        ("de:1e308,en:1e307", {"de": 116, "en": 12}),
    ],  # fmt: skip
)
def test_huge_mix_weights_split_the_budget_without_overflow(spec, counts):
    assert CalibrationMix.parse(spec).counts(128) == counts


def test_a_mix_built_in_python_refuses_infinite_weights():
    with pytest.raises(InputError, match="weight of de must be > 0 and finite, got inf"):
        CalibrationMix(("de",), (float("inf"),))


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("de.txt", b"one paragraph\n\nmore text \xff here\n", "de.txt:3: not UTF-8 text"),
        (
            "de.jsonl",
            b'{"text": "fine"}\n{"text": 5}\n',
            "de.jsonl:2: 'text' must be a string, got 5",
        ),
        ("de.jsonl", b'{"text": null}\n', "de.jsonl:1: 'text' must be a string, got null"),
        ("de.jsonl", b'{"text": "fine"}\n\xfe\n', "de.jsonl:2: not UTF-8 text"),
    ],
)
def test_bad_text_file_names_its_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        get_source(str(tmp_path)).documents("de", "calib")


def test_missing_tokenizer_message_is_a_complete_line(tmp_path):
    (tmp_path / "config.json").write_bytes((DEMO_MODEL_DIR / "config.json").read_bytes())
    with pytest.raises(InputError) as e:
        load_tokenizer(tmp_path)
    msg = str(e.value)
    assert "has no tokenizer" in msg and msg.endswith("tokenizer files into it")
    assert "\n" not in msg and "from one of:" not in msg


def test_data_show_with_a_model_loads_only_its_tokenizer(capsys, forbid_loading):
    assert cli("data", "show", "de,en", "--model", "demo", "--nsamples", "2", "--seqlen", "16") == 0
    assert "fingerprint" in capsys.readouterr().out


def test_data_free_method_warns_once_about_calibration_flags_given(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="polyprune"):
        assert cli("prune", "--model", "demo", "--method", "magnitude", "--calib", "de",
                   "--nsamples", "4", "-q", "--out", tmp_path / "o") == 0  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["--method magnitude uses no calibration data; ignoring --calib, --nsamples"]


def test_data_free_method_without_calibration_flags_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="polyprune"):
        assert cli("quantize", "--model", "demo", "--method", "rtn", "-q",
                   "--out", tmp_path / "o") == 0  # fmt: skip
    assert not [r for r in caplog.records if "calibration" in r.getMessage()]


# --- as a user's terminal sees it -----------------------------------------------------------


def _run(args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "polyprune.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize(
    "args, message",
    [
        (PRUNE + ["--device", "foo"], "unknown device 'foo'"),
        (PRUNE[:6] + ["de:1e308,en:1e309"], "weight of en must be > 0 and finite, got '1e309'"),
        (PRUNE[:6] + [LONG_MIX], "(120000 characters)"),
    ],
)
def test_bad_value_in_a_subprocess_is_one_line_and_exit_2(tmp_path, args, message):
    r = _run([*args, "--out", tmp_path / "out"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert message in _one_error_line(r.stderr, args[0])
    assert len(r.stderr) < 400
    assert not (tmp_path / "out").exists()


def test_a_non_utf8_source_in_a_subprocess_is_one_line(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "de.txt").write_bytes(b"caf\xe9 au lait\n")
    r = _run(["data", "ls", "--source", tmp_path / "src"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "de.txt:1: not UTF-8 text (byte 0xe9)" in _one_error_line(r.stderr, "data")


def test_quiet_eval_prints_no_progress_bar_and_no_git_error(tmp_path):
    """Run outside any git repository: lm-eval asks git for a commit hash there."""
    args = ["eval", "-q", "--model", "demo", "--langs", "de", "--tasks", "nextsent",
            "--limit", "2", "--max-tokens", "64", "--out", tmp_path / "e.json"]  # fmt: skip
    r = _run(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "%|" not in r.stderr and "it/s" not in r.stderr, r.stderr
    assert "fatal:" not in r.stderr, r.stderr

"""Bad model files and mismatched inputs: one line naming the file or key, exit code 2, never
random weights, a traceback, or numbers from models that do not belong together."""

from __future__ import annotations

import json
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from polyprune.cli import main
from polyprune.errors import InputError

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def run_cli(*args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "polyprune.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def one_error(stderr: str) -> str:
    """The single error line of a failed command (no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


def copy_with_config(src: str, config_from: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    shutil.copy(Path(config_from) / "config.json", dst / "config.json")
    return dst


def drop_tensor(model_dir: str | Path, key: str) -> None:
    path = Path(model_dir) / "model.safetensors"
    state = load_file(path)
    del state[key]
    save_file(state, path, metadata={"format": "pt"})


# --- safetensors damaged in the ways a copy or download goes wrong ----------------------------


def _header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def _bad_offsets(data: bytes) -> bytes:
    n, header = _header(data)
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10**6
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


CORRUPTIONS = {
    "truncated": lambda d: d[: len(d) // 2],
    "garbage header": lambda d: d[:8] + b"#" * _header(d)[0] + d[8 + _header(d)[0] :],
    "absurd header length": lambda d: struct.pack("<Q", 1 << 60) + d[8:],
    "bad offsets": _bad_offsets,
}


def corrupt(path: Path, how: str) -> None:
    path.write_bytes(CORRUPTIONS[how](path.read_bytes()))


# --- 1. weights that do not fit the config ----------------------------------------------------


def test_no_stream_prune_refuses_llama_weights_under_a_gpt2_config(tiny_model_dir, tmp_path):
    bad = copy_with_config(tiny_model_dir("llama"), tiny_model_dir("gpt2"), tmp_path / "bad")
    out = tmp_path / "out"
    r = run_cli("prune", "--model", bad, "--method", "magnitude", "--no-stream", "--out", out, "-q")
    assert r.returncode == 2, r.stderr
    err = one_error(r.stderr)
    assert f"model {str(bad)!r} does not fit its config (gpt2)" in err
    assert "missing transformer.h.0.attn.c_attn.bias" in err
    assert "unexpected model.embed_tokens.weight" in err
    assert not out.exists()


@pytest.mark.parametrize("stream", [False, True])
def test_prune_refuses_a_checkpoint_that_lacks_a_weight(tiny_model_dir, tmp_path, capsys, stream):
    path = tiny_model_dir("llama")
    drop_tensor(path, "model.layers.1.mlp.down_proj.weight")
    flag = "--stream" if stream else "--no-stream"
    out = tmp_path / "out"
    assert cli("prune", "--model", path, "--method", "magnitude", flag, "--out", out, "-q") == 2
    err = one_error(capsys.readouterr().err)
    assert "does not fit its config (llama): missing model.layers.1.mlp.down_proj.weight" in err
    assert not out.exists()


def test_streamed_prune_refuses_weights_of_another_model_without_advising_no_stream(
    tiny_model_dir, tmp_path, capsys
):
    bad = copy_with_config(tiny_model_dir("llama"), tiny_model_dir("gpt2"), tmp_path / "bad")
    args = ["prune", "--model", bad, "--method", "magnitude", "--stream", "--out", tmp_path / "o"]
    assert cli(*args, "-q") == 2
    err = one_error(capsys.readouterr().err)
    assert "does not fit its config (gpt2): missing transformer.h.0" in err
    assert "--no-stream" not in err


@pytest.mark.parametrize("stream", [False, True])
def test_weights_of_other_shapes_than_the_config_are_refused(tiny_model_dir, tmp_path, stream):
    from polyprune.api import prune

    path = Path(tiny_model_dir("llama"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"intermediate_size": 96}))
    with pytest.raises(InputError, match="other shapes for model.layers.0.mlp.down_proj.weight"):
        prune(str(path), method="magnitude", stream=stream, out=tmp_path / "o", progress=False)


def test_tied_lm_head_may_be_absent_and_weights_of_other_models_may_not(tiny_model_dir):
    from polyprune.models import load_model

    gpt2 = tiny_model_dir("gpt2")  # tied: save_pretrained leaves lm_head.weight out
    assert "lm_head.weight" not in load_file(Path(gpt2) / "model.safetensors")
    load_model(gpt2, tokenizer=False)
    llama = tiny_model_dir("llama")  # untied: its lm_head is a weight of its own
    drop_tensor(llama, "lm_head.weight")
    with pytest.raises(InputError, match="missing lm_head.weight"):
        load_model(llama, tokenizer=False)


# --- 3. damaged files ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_damaged_safetensors_are_one_line_naming_the_file(tiny_model_dir, tmp_path, how):
    from polyprune.compress.stream import Checkpoint, empty_model
    from polyprune.models import load_config, load_model

    path = Path(tiny_model_dir("llama"))
    skeleton = empty_model(load_config(path), torch.float32)
    corrupt(path / "model.safetensors", how)
    expected = f"{path / 'model.safetensors'} is not a readable safetensors file"
    with pytest.raises(InputError, match="is not a readable safetensors file") as e:
        load_model(path, tokenizer=False)
    assert str(e.value).startswith(expected)
    with pytest.raises(InputError) as e:
        Checkpoint(path, skeleton)
    assert str(e.value).startswith(expected)


def test_damaged_shard_is_named_by_the_cli(tiny_model_dir, tmp_path, capsys):
    path = Path(tiny_model_dir("llama"))
    corrupt(path / "model.safetensors", "truncated")
    assert cli("prune", "--model", path, "--method", "magnitude", "--out", tmp_path / "o") == 2
    err = one_error(capsys.readouterr().err)
    assert f"{path / 'model.safetensors'} is not a readable safetensors file" in err
    assert "truncated" in err


def test_index_naming_a_missing_shard_is_refused(tiny_model_dir):
    from polyprune.models import load_model

    path = Path(tiny_model_dir("llama"))
    keys = list(load_file(path / "model.safetensors"))
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "model-00001-of-00002.safetensors")}
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    index["weight_map"][keys[0]] = "model-00002-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match="names shard model-00002-of-00002.safetensors, which"):
        load_model(path, tokenizer=False)


class _NotATensor:
    pass


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (lambda sd: {"model": sd, "step": 3}, "is not a plain state dict: 'model' holds a"),
        (lambda sd: {"w": _NotATensor()}, "pickles objects other than tensors"),
        (lambda sd: [1, 2], "holds a list, not a state dict of tensors"),
        (None, "is not a readable PyTorch file"),
    ],
)
def test_pickle_that_is_not_a_plain_state_dict_is_refused(tiny_model_dir, content, message):
    from polyprune.models import load_model

    path = Path(tiny_model_dir("llama"))
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    if content is None:
        (path / "pytorch_model.bin").write_bytes(b"not a pickle at all " * 20)
    else:
        torch.save(content(state), path / "pytorch_model.bin")
    with pytest.raises(InputError, match=message) as e:
        load_model(path, tokenizer=False)
    assert str(e.value).startswith(str(path / "pytorch_model.bin"))
    assert "safetensors is the preferred format" in str(e.value)


def test_plain_pickled_state_dict_still_loads(tiny_model_dir):
    from polyprune.models import load_model

    path = Path(tiny_model_dir("llama"))
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    torch.save(state, path / "pytorch_model.bin")
    model = load_model(path, tokenizer=False).model
    torch.testing.assert_close(model.model.norm.weight, state["model.norm.weight"])


# --- 2. and 4. analyze: runs of the dense model, masks of its Linears -----------------------


def _run(model: str, out: Path, masks: bool = False, mix: str | None = None) -> Path:
    """A magnitude run of ``model``; ``mix`` sets the calibration mix its manifest records (IoU
    compares runs of different mixes)."""
    from polyprune.api import prune

    prune(model, method="magnitude", out=out, save_masks=masks, progress=False)
    if mix is not None:
        manifest = json.loads((out / "polyprune.json").read_text())
        manifest["calibration"] = {"mix": mix, "seed": 0}
        (out / "polyprune.json").write_text(json.dumps(manifest))
    return out


def test_analyze_refuses_a_run_of_another_architecture_of_the_same_sizes(tiny_model_dir, tmp_path):
    dense = tiny_model_dir("llama")
    run = _run(tiny_model_dir("qwen2"), tmp_path / "qwen2-run")
    r = run_cli("analyze", "--dense", dense, "--compressed", run, "--langs", "de,en",
                "--seqlen", "32", "--out", tmp_path / "report", "-q")  # fmt: skip
    assert r.returncode == 2, r.stderr
    err = one_error(r.stderr)
    assert f"run {str(run)!r} is a qwen2 model (model_type), the dense model llama" in err
    assert not (tmp_path / "report").exists()


def test_analyze_refuses_a_gpt2_run_against_a_llama_dense_model(tiny_model_dir, tmp_path, capsys):
    run = _run(tiny_model_dir("gpt2"), tmp_path / "gpt2-run")
    assert cli("analyze", "--dense", tiny_model_dir("llama"), "--compressed", run, "--langs",
               "de,en", "--seqlen", "32", "--out", tmp_path / "r", "-q") == 2  # fmt: skip
    assert "is a gpt2 model (model_type), the dense model llama" in one_error(
        capsys.readouterr().err
    )


def test_analyze_names_a_damaged_run_checkpoint_before_loading_any(
    tiny_model_dir, tmp_path, capsys
):
    dense = tiny_model_dir("llama")
    run = _run(dense, tmp_path / "run")
    corrupt(run / "model.safetensors", "bad offsets")
    assert cli("analyze", "--dense", dense, "--compressed", run, "--langs", "de,en",
               "--seqlen", "32", "--out", tmp_path / "r", "-q") == 2  # fmt: skip
    err = one_error(capsys.readouterr().err)
    assert f"{run / 'model.safetensors'} is not a readable safetensors file" in err


def test_analyze_refuses_a_run_made_from_another_dense_model(tiny_model_dir, tmp_path, capsys):
    from tests.conftest import tiny_model

    source = tiny_model_dir("llama")
    run = _run(source, tmp_path / "run")
    other = Path(shutil.copytree(source, tmp_path / "other"))  # same config, other weights
    tiny_model("llama", seed=1).save_pretrained(other)
    base = [
        "analyze",
        "--compressed",
        run,
        "--langs",
        "de,en",
        "--seqlen",
        "32",
        "--out",
        tmp_path / "r",
        "-q",
    ]
    assert cli(*base, "--dense", other) == 2
    err = one_error(capsys.readouterr().err)
    assert f"run {str(run)!r} was made from {source}, not from the dense model {other}" in err


def test_analyze_accepts_the_same_dense_model_under_another_name(tiny_model_dir, tmp_path):
    from polyprune.analysis.analyze import describe_runs
    from polyprune.analysis.checks import check_runs_match, same_source
    from polyprune.models import DEMO_MODEL_DIR, load_config

    source = tiny_model_dir("llama")
    runs = describe_runs([_run(source, tmp_path / "run")])
    copy = shutil.copytree(source, tmp_path / "copy")
    for dense in (source, copy, str(Path(source).resolve())):
        check_runs_match(str(dense), load_config(dense), runs)
    demo = load_config("demo")
    assert same_source(str(DEMO_MODEL_DIR), "demo", str(DEMO_MODEL_DIR), demo)
    assert same_source("LlamaForCausalLM", "demo", str(DEMO_MODEL_DIR), demo)  # API, no name
    assert same_source("Qwen2ForCausalLM", "demo", str(DEMO_MODEL_DIR), demo) is False
    assert same_source("org/a", "org/b", "org/b", demo) is False
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    assert same_source("org/name", str(snapshot), str(snapshot), demo)


@pytest.fixture
def iou_runs(tiny_model_dir, tmp_path):
    """The tiny Llama and two runs of it with masks, recorded as of two calibration mixes."""
    dense = tiny_model_dir("llama")
    runs = [_run(dense, tmp_path / f"run-{mix}", masks=True, mix=mix) for mix in ("de", "ar")]
    return dense, runs


def _analyze_iou(dense, runs, out: Path) -> int:
    return cli("analyze", "--dense", dense, "--compressed", *runs, "--langs", "de,en",
               "--seqlen", "32", "--metrics", "iou", "--out", out, "-q")  # fmt: skip


def test_analyze_iou_of_sound_masks_runs(iou_runs, tmp_path):
    assert _analyze_iou(*iou_runs, tmp_path / "r") == 0


@pytest.mark.parametrize(
    ("masks_of", "message"),
    [
        ("truncated", "is not a readable safetensors file"),
        ("opt", "model.decoder.layers.0.fc1 is not a Linear of the dense model"),
        ("llama-32", "the mask of model.layers.0.mlp.down_proj is 32 x 64, the Linear 64 x 128"),
    ],
)
def test_analyze_refuses_masks_that_are_not_of_the_dense_model(
    iou_runs, tiny_model_dir, tmp_path, capsys, masks_of, message
):
    dense, runs = iou_runs
    masks = runs[1] / "masks.safetensors"
    if masks_of == "truncated":
        corrupt(masks, "truncated")
    else:
        family, _, hidden = masks_of.partition("-")
        model = tiny_model_dir(family, **({"hidden": int(hidden)} if hidden else {}))
        shutil.copy(_run(model, tmp_path / "other", masks=True) / "masks.safetensors", masks)
    assert _analyze_iou(dense, runs, tmp_path / "r") == 2
    err = one_error(capsys.readouterr().err)
    assert f"{masks}" in err and message in err
    assert not (tmp_path / "r").exists()


def test_load_masks_checks_each_entry_against_its_packed_bits(iou_runs):
    from polyprune.compress.export import load_masks, masks_metadata

    path = iou_runs[1][1] / "masks.safetensors"
    packed = load_file(path)
    shapes = {k: [64, 64] for k in packed}  # q_proj is 64 x 64; the MLP's are not
    save_file(packed, path, metadata=masks_metadata(shapes))
    with pytest.raises(InputError, match=r"mask model.layers.0.mlp.down_proj holds U8 \[1024\]"):
        load_masks(path)
    save_file(packed, path, metadata={"format": "pt"})
    with pytest.raises(InputError, match="is not a polyprune masks file"):
        load_masks(path)


# --- 5. the results store of a matrix ---------------------------------------------------------


def _matrix_config(tmp_path: Path) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    raw["workdir"] = str(tmp_path / "work")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_matrix_refuses_a_store_that_is_not_sqlite(tmp_path):
    config = _matrix_config(tmp_path)
    store = tmp_path / "work" / "results.sqlite"
    store.parent.mkdir()
    store.write_bytes(b"these are my notes, not a database\n" * 200)
    r = run_cli("matrix", config, "-q")
    assert r.returncode == 2, r.stderr
    err = one_error(r.stderr)
    assert f"results store {store} is not a readable SQLite database" in err
    assert "move it aside" in err
    assert store.read_bytes().startswith(b"these are my notes")


@pytest.mark.parametrize("flag", ["--dry-run", "--tables-only"])
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_matrix_dry_run_and_tables_refuse_a_damaged_store(tmp_path, capsys, flag, damage):
    from polyprune.eval.store import ResultStore

    config = _matrix_config(tmp_path)
    store = tmp_path / "work" / "results.sqlite"
    store.parent.mkdir()
    if damage == "foreign":
        with sqlite3.connect(store) as conn:
            conn.execute("CREATE TABLE notes (day TEXT, text TEXT)")
    else:
        ResultStore(store).close()
        data = store.read_bytes()
        store.write_bytes(data[: len(data) // 2 + 100])
    before = store.read_bytes()
    assert cli("matrix", config, flag, "-q") == 2
    err = one_error(capsys.readouterr().err)
    assert f"results store {store} is" in err and "move it aside" in err
    assert store.read_bytes() == before  # nothing written into it

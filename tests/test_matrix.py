"""Evaluation matrices on the demo model: config checks, the store's rows, no work twice, a
SIGKILLed run that resumes, and the Ray executor giving the rows of the local one."""

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from polyprune.cli import main
from polyprune.data.heldout import heldout_stream
from polyprune.eval.matrix import expand, load_config
from polyprune.eval.perplexity import perplexity
from polyprune.eval.store import ResultStore
from polyprune.models import load_model

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
# 5 cells (dense + wanda x 2 mixes x 2 seeds) x (ppl + nextsent acc, acc_norm) x 2 languages
CELLS, ROWS_PER_CELL = 5, 6


def write_config(tmp_path: Path, name: str = "m", **changes) -> Path:
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["workdir"] = str(tmp_path / name)
    for key, value in changes.items():
        section, _, sub = key.partition("__")
        if sub:
            raw[section][sub] = value
        elif value is None:
            raw.pop(section)
        else:
            raw[section] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*args):
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def rows_by_key(store_path: Path) -> dict:
    with ResultStore(store_path) as store:
        return {
            (r["model"], r["method"], r["level"], r["mix"], r["seed"], r["task"], r["lang"],
             r["metric"]): r["value"]
            for r in store.results()
        }  # fmt: skip


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"eval__lang": ["de"]}, "unknown key 'lang' in eval"),
        ({"methods": ["wanda", "obc"]}, "unknown method 'obc'"),
        ({"mixes": ["de:x"]}, "de:x"),
        ({"mixes": ["de", "xx"]}, "unknown language 'xx'"),
        ({"eval__tasks": ["ppl", "squad"]}, "unknown task 'squad'"),
        ({"sparsities": [1.5]}, "outside [0, 1)"),
        ({"models": None}, "missing key 'models'"),
        ({"dense_baseline": "yes"}, "dense_baseline must be bool"),
        ({"calibration__nsamples": "8"}, "nsamples in calibration must be int"),
        ({"sparsities": ["half"]}, "entry 'half' is not a number"),
        ({"analyses": ["lape"]}, "unknown analysis 'lape'"),
        ({"executor__gpus": 1}, "unknown key 'gpus' in executor"),
    ],
)
def test_config_errors_exit_2_with_one_line_before_any_work(tmp_path, capsys, changes, message):
    cfg = write_config(tmp_path, **changes)
    assert cli("matrix", cfg, "-q") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "m").exists()


def test_dry_run_lists_the_cells_and_writes_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli("matrix", cfg, "--dry-run", "-q") == 0
    out = capsys.readouterr().out
    assert out.count("todo") == CELLS and "5 cells, 0 done" in out
    assert "demo/wanda/0.5/de/seed42" in out and "demo/dense" in out
    assert not (tmp_path / "m").exists()


def test_expansion_gives_one_cell_per_data_free_level(tmp_path):
    cfg = load_config(write_config(tmp_path, methods=["magnitude", "wanda"], sparsities=[0.5, 0.6]))
    labels = [c.label for c in expand(cfg)]
    assert labels[:3] == ["demo/dense", "demo/magnitude/0.5", "demo/magnitude/0.6"]
    assert len(labels) == 1 + 2 + 2 * 2 * 2
    assert len({c.cell_id for c in expand(cfg)}) == len(labels)


@pytest.fixture(scope="session")
def local_run(tmp_path_factory):
    """The demo matrix run once for the whole test session, shared by the xdist workers through
    a lock in their common temporary root: it is the most expensive part of the suite."""
    pytest.importorskip("lm_eval")
    from filelock import FileLock

    # Under xdist the workers' temporary roots share this session's parent; without xdist the
    # parent is shared by every earlier session too, and a stale run would be reused.
    base = tmp_path_factory.getbasetemp()
    root = (
        base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    ) / "polyprune-local-matrix"
    root.mkdir(exist_ok=True)
    with FileLock(str(root / "lock")):
        cfg, timing = root / "m.yaml", root / "seconds.json"
        if not timing.is_file():
            cfg = write_config(root)
            t = time.perf_counter()
            assert cli("matrix", cfg, "-q") == 0
            timing.write_text(json.dumps(time.perf_counter() - t))
        return cfg, load_config(cfg), json.loads(timing.read_text())


def test_matrix_fills_the_store_with_one_row_per_cell_task_language_metric(local_run):
    _, cfg, _ = local_run
    rows = rows_by_key(cfg.store_path)
    assert len(rows) == CELLS * ROWS_PER_CELL
    with ResultStore(cfg.store_path) as store:
        assert len(store.done_cells()) == CELLS
        one = store.results(mix="de", seed=42, task="ppl", lang="en")
    full = json.loads(one[0]["config"])
    assert full["nsamples"] == 8 and full["seqlen"] == 64 and full["source"] == "bundled"
    assert full["mix"] == "de" and full["seed"] == 42 and full["eval"]["langs"] == ["de", "en"]
    for mix in ("de", "en"):
        for seed in (0, 42):
            for lang in ("de", "en"):
                assert 0 <= rows[("demo", "wanda", "0.5", mix, seed, "nextsent", lang, "acc")] <= 1
    assert (cfg.tables_dir / "demo__wanda-0.5__ppl-ppl.png").is_file()


def test_stored_perplexities_equal_a_direct_evaluation(local_run):
    _, cfg, _ = local_run
    rows = rows_by_key(cfg.store_path)
    dense = load_model("demo")
    ppl = cfg.eval.ppl
    kw = dict(seqlen=ppl.seqlen, max_tokens=ppl.max_tokens, progress=False)
    direct = perplexity(dense.model, dense.tokenizer, ["de", "en"], **kw)
    for lang in ("de", "en"):
        got = rows[("demo", "dense", "dense", "-", None, "ppl", lang, "ppl")]
        assert got == pytest.approx(direct[lang].ppl, rel=1e-6)
    cell = next(c for c in expand(cfg) if c.label == "demo/wanda/0.5/en/seed0")
    pruned = load_model(cell.compressed_dir(), tokenizer=False).model
    direct = perplexity(pruned, dense.tokenizer, ["de"], **kw)["de"].ppl
    assert rows[("demo", "wanda", "0.5", "en", 0, "ppl", "de", "ppl")] == pytest.approx(direct)
    assert direct > rows[("demo", "dense", "dense", "-", None, "ppl", "de", "ppl")]


def test_the_store_keeps_per_document_and_per_example_scores(local_run):
    _, cfg, _ = local_run
    with ResultStore(cfg.store_path) as store:
        rows, units = store.results(), store.units()
    by_key: dict = {}
    for u in units:
        by_key.setdefault((u["cell_id"], u["task"], u["lang"], u["metric"]), []).append(u)
    for r in rows:
        got = by_key[(r["cell_id"], r["task"], r["lang"], r["metric"])]
        if r["task"] == "ppl":  # exp(sum of document NLL / sum of their tokens) is the ppl
            nll, tokens = sum(u["value"] for u in got), sum(u["weight"] for u in got)
            assert tokens == r["n"] and len(got) >= 2
            assert math.exp(nll / tokens) == pytest.approx(r["value"], rel=1e-9)
        elif r["metric"] in ("acc", "acc_norm"):  # one 0/1 score per example
            assert len(got) == cfg.eval.limit
            assert sum(u["value"] for u in got) / len(got) == pytest.approx(r["value"])


def test_tables_only_regenerates_the_same_summary_and_tables(local_run, capsys):
    path, cfg, _ = local_run
    summary = cfg.tables_dir / "summary.md"
    first = {p.name: p.read_bytes() for p in cfg.tables_dir.iterdir() if p.suffix != ".png"}
    assert cli("matrix", path, "--tables-only", "-q") == 0
    assert f"summary     {summary}" in capsys.readouterr().out
    again = {p.name: p.read_bytes() for p in cfg.tables_dir.iterdir() if p.suffix != ".png"}
    assert again == first
    text = summary.read_text()
    assert "## demo · wanda 0.5 · ppl (ppl, lower is better)" in text
    assert "Calibrating on the target language is best or tied with the best in " in text
    assert "differ significantly from the dense model" in text
    assert "[" in (cfg.tables_dir / "demo__wanda-0.5__ppl-ppl.md").read_text()  # intervals


def test_a_second_run_does_no_work(local_run, capsys):
    path, cfg, first_seconds = local_run
    before = rows_by_key(cfg.store_path)
    mtimes = {p: p.stat().st_mtime_ns for p in (Path(cfg.workdir) / "compressed").iterdir()}
    t = time.perf_counter()
    assert cli("matrix", path, "-q") == 0
    assert "5 done before, 0 run now" in capsys.readouterr().out
    assert time.perf_counter() - t < first_seconds / 2
    assert rows_by_key(cfg.store_path) == before
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_a_run_killed_after_its_first_cell_resumes_without_duplicates(tmp_path):
    path = write_config(tmp_path, "killed")
    cfg = load_config(path)
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyprune.cli", "matrix", str(path), "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    done = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if cfg.store_path.is_file():
                with sqlite3.connect(cfg.store_path) as conn:
                    try:
                        done = conn.execute("SELECT COUNT(*) FROM cells").fetchone()[0]
                    except sqlite3.OperationalError:  # schema not created yet
                        done = 0
                if done >= 1:
                    proc.send_signal(signal.SIGKILL)
                    break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with ResultStore(cfg.store_path) as store:
        finished = store.done_cells()
        rows = store.results()
        unit_cells = {u["cell_id"] for u in store.units()}
    assert 1 <= len(finished) < CELLS
    # Only whole cells are in the store: the cell that was running left no rows, no units.
    assert {r["cell_id"] for r in rows} == finished == unit_cells
    assert len(rows) == len(finished) * ROWS_PER_CELL

    assert cli("matrix", path, "-q") == 0
    with ResultStore(cfg.store_path) as store:
        rows = store.results()
        assert len(store.done_cells()) == CELLS
    keys = [(r["cell_id"], r["task"], r["lang"], r["metric"]) for r in rows]
    assert len(keys) == len(set(keys)) == CELLS * ROWS_PER_CELL


def test_the_ray_executor_yields_the_rows_of_the_local_one(local_run, tmp_path):
    pytest.importorskip("ray")
    _, local_cfg, _ = local_run
    path = write_config(tmp_path, "ray")
    assert cli("matrix", path, "--executor", "ray", "-q") == 0
    ray_rows = rows_by_key(load_config(path).store_path)
    local_rows = rows_by_key(local_cfg.store_path)
    assert ray_rows.keys() == local_rows.keys()
    for key, value in local_rows.items():
        assert ray_rows[key] == pytest.approx(value, rel=1e-4), key


def test_tables_only_needs_a_store(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert cli("matrix", cfg, "--tables-only", "-q") == 2
    assert "no results store" in capsys.readouterr().err


def test_an_unavailable_task_is_reported_and_the_cell_still_finishes(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    path = write_config(
        tmp_path, methods=["magnitude"], dense_baseline=False, mixes=None, seeds=None,
        eval__tasks=["ppl", "belebele"], eval__langs=["sw"],
    )  # fmt: skip
    assert cli("matrix", path, "-q") == 0
    out = capsys.readouterr().out
    assert "1 run now, 0 failed" in out
    assert "unavailable belebele/sw: belebele_swh_Latn" in out
    rows = rows_by_key(load_config(path).store_path)
    assert list(rows) == [("demo", "magnitude", "0.5", "-", None, "ppl", "sw", "ppl")]


def hooked_block_outputs(model, ids):
    """Outputs of every decoder block, captured by forward hooks (not the engine's capture)."""
    outs, hooks = [], []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_hook(
            lambda m, a, out: outs.append((out[0] if isinstance(out, tuple) else out).double())
        ))  # fmt: skip
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return outs


def test_analyses_store_snr_and_pruning_error_against_the_dense_model(tmp_path):
    path = write_config(
        tmp_path, methods=["magnitude"], dense_baseline=False, mixes=None, seeds=None,
        eval__tasks=["ppl"], eval__langs=["de"], analyses=["snr", "error"],
    )  # fmt: skip
    cfg = load_config(path)
    assert cli("matrix", path, "-q") == 0
    rows = rows_by_key(cfg.store_path)
    key = ("demo", "magnitude", "0.5", "-", None)
    snr, pe = rows[(*key, "snr", "de", "snr_db")], rows[(*key, "error", "de", "pruning_error")]

    dense = load_model("demo")
    (cell,) = expand(cfg)
    pruned = load_model(cell.compressed_dir(), tokenizer=False).model
    stream = heldout_stream(dense.tokenizer, "de", "bundled", cfg.eval.ppl.max_tokens)
    T = cfg.eval.ppl.seqlen
    ids = stream[: len(stream) // T * T].view(-1, T)
    keep = ~torch.isin(ids, torch.tensor(dense.tokenizer.all_special_ids))  # EOS left out
    assert not keep.all()
    snrs, pes = [], []
    outs = hooked_block_outputs(dense.model, ids), hooked_block_outputs(pruned, ids)
    for h, h2 in zip(*outs, strict=True):
        h, h2 = h[keep], h2[keep]
        err = ((h - h2) ** 2).sum().item()
        snrs.append(10 * math.log10((h**2).sum().item() / err))
        c = h.norm(dim=-1).mean().item()
        pes.append(err / (h.shape[0] * h.shape[1]) / c**2)
    assert snr == pytest.approx(sum(snrs) / len(snrs), rel=1e-4)
    assert pe == pytest.approx(sum(pes) / len(pes), rel=1e-4)
    assert 0 < snr < 60


def test_a_finished_compressed_output_is_reused_only_when_its_manifest_matches(tmp_path):
    path = write_config(
        tmp_path, methods=["magnitude"], dense_baseline=False, mixes=None, seeds=None,
        eval__tasks=["ppl"], eval__langs=["de"],
    )  # fmt: skip
    cfg = load_config(path)
    assert cli("matrix", path, "-q") == 0
    first = rows_by_key(cfg.store_path)
    (cell,) = expand(cfg)
    weights = cell.compressed_dir() / "model.safetensors"
    stamp = weights.stat().st_mtime_ns

    cfg.store_path.unlink()  # the store is lost, the compressed model is not: reused
    assert cli("matrix", path, "-q") == 0
    assert rows_by_key(cfg.store_path) == first
    assert weights.stat().st_mtime_ns == stamp

    manifest = cell.compressed_dir() / "polyprune.json"
    m = json.loads(manifest.read_text())
    m["settings"]["sparsity"] = 0.6  # not this cell's output any more: compressed again
    manifest.write_text(json.dumps(m))
    cfg.store_path.unlink()
    assert cli("matrix", path, "-q") == 0
    assert rows_by_key(cfg.store_path) == pytest.approx(first)
    assert weights.stat().st_mtime_ns != stamp
    assert json.loads(manifest.read_text())["settings"]["sparsity"] == 0.5


def test_an_output_calibrated_before_bos_first_windows_is_not_reused(tmp_path):
    """Outputs whose manifest does not say how its windows were cut (before windows started
    with BOS) are compressed again, not reused: on Gemma that changes perplexity 8x."""
    from polyprune.data.mix import WINDOWS_PROTOCOL
    from polyprune.eval.matrix import _manifest_matches
    from polyprune.models import resolve_model_path

    cfg = load_config(write_config(tmp_path, methods=["wanda"], mixes=["de"], seeds=[0]))
    cell = next(c for c in expand(cfg) if c.method == "wanda")
    cal = cfg.calibration
    out = tmp_path / "out"
    out.mkdir()
    manifest = {
        "method": "wanda", "model": resolve_model_path(cell.model),
        "settings": {"sparsity": cell.sparsity, "pattern": cfg.pattern},
        "calibration": {"mix": "de", "seed": 0, "nsamples": cal.nsamples, "seqlen": cal.seqlen,
                        "sampling": cal.sampling, "windows": WINDOWS_PROTOCOL},
    }  # fmt: skip
    (out / "polyprune.json").write_text(json.dumps(manifest))
    assert _manifest_matches(out, cell)
    del manifest["calibration"]["windows"]
    (out / "polyprune.json").write_text(json.dumps(manifest))
    assert not _manifest_matches(out, cell)


def test_a_sweep_config_writes_each_pruned_cell_from_one_sweep(tmp_path, monkeypatch):
    """``sweep: true``: one sweep per (model, method, sparsity, seed) writes every mix's model
    (dense propagation), each equal bit for bit to ``prune --propagate dense``; the cells then
    reuse them, and a second run sweeps nothing."""
    from safetensors.torch import load_file

    import polyprune.eval.matrix as matrix_mod
    from polyprune.api import prune

    path = write_config(tmp_path, sweep=True, seeds=[0], dense_baseline=False,
                        eval__tasks=["ppl"], eval__langs=["de"])  # fmt: skip
    cfg = load_config(path)
    calls = []
    real = matrix_mod.sweep_cells
    monkeypatch.setattr(matrix_mod, "sweep_cells", lambda c, p=True: calls.append(real(c, p)))
    assert cli("matrix", path, "-q") == 0
    assert calls == [1]  # one (model, method, sparsity, seed): one sweep for both mixes
    cells = expand(cfg)
    assert {c.mix for c in cells} == {"de", "en"}
    for cell in cells:
        m = json.loads((cell.compressed_dir() / "polyprune.json").read_text())
        assert m["settings"]["propagate"] == "dense" and "sweep" in m["settings"]
    cal = cfg.calibration
    ref = tmp_path / "ref"
    prune("demo", method="wanda", calib="de", nsamples=cal.nsamples, seqlen=cal.seqlen,
          propagate="dense", out=ref, stream=True, progress=False)  # fmt: skip
    got = load_file(str(next(c for c in cells if c.mix == "de").compressed_dir()
                        / "model.safetensors"))  # fmt: skip
    want = load_file(str(ref / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    cfg.store_path.unlink()  # the models stay: reused, no sweep
    assert cli("matrix", path, "-q") == 0
    assert calls == [1, 0]


def test_sweep_needs_kept_compressed_models(tmp_path, capsys):
    path = write_config(tmp_path, sweep=True, keep_compressed=False)
    assert cli("matrix", path, "-q") == 2
    assert "keep_compressed" in capsys.readouterr().err

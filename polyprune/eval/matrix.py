"""Evaluation matrices: a YAML grid -> cells -> executor (local or Ray) -> results store.

A *cell* is one compressed model (model x method x sparsity or bit-width x calibration mix x
seed; or the dense baseline) evaluated on every task x evaluation language of the config. Its
id is a hash of its full config, so re-running a config skips the cells already in the store,
and changing any setting makes new cells. A cell's rows are stored in one transaction when it
has finished (``store.py``): a cell killed midway leaves nothing and is redone.

The config is checked whole before any work (unknown key, unknown method, bad mix, unknown
language, ...), and the compressed models of finished cells are reused when their manifest
matches. With Ray, each cell is one Ray task with the resources the config asks for; results
come back to the driver, which alone writes the store.

The config and its checks: ``matrixconfig.py``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from polyprune.analysis.metric import get_metric
from polyprune.data.mix import WINDOWS_PROTOCOL
from polyprune.errors import InputError
from polyprune.eval.evaluate import evaluate_cell
from polyprune.eval.matrixconfig import (  # re-exported: the matrix's public names
    ANALYSES,
    ANALYSIS_WINDOWS,
    DATA_FREE,
    PRUNE_METHODS,
    QUANT_METHODS,
    CalibrationSettings,
    ExecutorSettings,
    MatrixConfig,
    load_config,
    profile_applies,
)
from polyprune.eval.store import ResultRow, ResultStore, UnitScores

__all__ = [
    "ANALYSES",
    "DATA_FREE",
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "Cell",
    "CalibrationSettings",
    "CellResult",
    "ExecutorSettings",
    "MatrixConfig",
    "MatrixReport",
    "expand",
    "load_config",
    "run_cell",
    "run_matrix",
    "sweep_cells",
]

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")
# Environment a Ray worker needs to see as the driver does (offline flags, caches, mirrors).
_FORWARD_ENV = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
    "POLYPRUNE_CACHE", "POLYPRUNE_MC4_ROOT", "POLYPRUNE_MKQA", "POLYPRUNE_KERNELS",
)  # fmt: skip


# ----------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One compressed model (or the dense baseline) and everything it is evaluated on."""

    model: str
    method: str  # "dense" for the baseline
    sparsity: float | None
    bits: int | None
    mix: str | None
    seed: int | None
    cfg: MatrixConfig
    profile: str = "uniform"  # layer-wise sparsity of a pruning cell

    @property
    def level(self) -> str:
        """``0.5``, ``4bit``; a profile other than uniform is part of it (``0.7-owl``): the
        store's key columns and the tables stay as they were."""
        if self.method == "dense":
            return "dense"
        if self.bits is not None:
            return f"{self.bits}bit"
        return f"{self.sparsity:g}" + ("" if self.profile == "uniform" else f"-{self.profile}")

    @property
    def label(self) -> str:
        parts = [Path(self.model).name or self.model, self.method]
        if self.method != "dense":
            parts.append(self.level)
        if self.mix is not None:
            parts += [self.mix, f"seed{self.seed}"]
        return "/".join(parts)

    def compress_config(self) -> dict:
        """What defines the compressed weights (and so the reusable output)."""
        c = {"model": self.model, "method": self.method}
        if self.method == "dense":
            return c
        c |= {"dtype": self.cfg.dtype}
        if self.method in PRUNE_METHODS:
            c |= {"sparsity": self.sparsity, "pattern": self.cfg.pattern}
            if self.profile != "uniform":  # absent for uniform: earlier cells keep their ids
                c |= {"profile": self.profile, "owl_m": self.cfg.owl_m,
                      "owl_lambda": self.cfg.owl_lambda}  # fmt: skip
        else:
            c |= {"bits": self.bits, "group_size": self.cfg.group_size}
        if self.mix is not None:
            c |= {"mix": self.mix, "seed": self.seed} | asdict(self.cfg.calibration)
        if self.swept:  # not the reference propagation: other weights, another output
            c |= {"propagate": "dense"}
        return c

    @property
    def swept(self) -> bool:
        """Whether the cell's model comes from a sweep (dense propagation)."""
        return self.cfg.sweep and self.method in PRUNE_METHODS and self.mix is not None

    def config(self) -> dict:
        """The cell's full config: compression, evaluation and analyses."""
        extra = {"analyses": list(self.cfg.analyses)} if self.cfg.analyses else {}
        return self.compress_config() | {"eval": asdict(self.cfg.eval)} | extra

    @property
    def cell_id(self) -> str:
        return _digest(self.config())

    def keys(self) -> dict:
        return {"model": self.model, "method": self.method, "level": self.level,
                "mix": self.mix or "-", "seed": self.seed}  # fmt: skip

    def compressed_dir(self) -> Path:
        name = self.label.replace("/", "__").replace(",", "+").replace(":", "x")
        return Path(self.cfg.workdir) / "compressed" / f"{name}-{_digest(self.compress_config())}"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def expand(cfg: MatrixConfig) -> list[Cell]:
    """The grid in order: per model the dense baseline, then methods x levels x mixes x seeds.
    Methods that use no data (magnitude, rtn) get one cell per level."""
    cells = []
    for model in cfg.models:
        if cfg.dense_baseline:
            cells.append(Cell(model, "dense", None, None, None, None, cfg))
        for method in cfg.methods:
            levels = (
                [(s, None) for s in cfg.sparsities]
                if method in PRUNE_METHODS
                else [(None, b) for b in cfg.bits]
            )
            # quantisers have no profile dimension (the config check refuses a pruning
            # method that none of the profiles applies to)
            profiles = [p for p in cfg.profiles if profile_applies(p, method)] or ["uniform"]
            for (sparsity, bits), profile in itertools.product(levels, profiles):
                if method in DATA_FREE:
                    cells.append(Cell(model, method, sparsity, bits, None, None, cfg, profile))
                    continue
                for mix in cfg.mixes:
                    for seed in cfg.seeds:
                        cells.append(Cell(model, method, sparsity, bits, mix, seed, cfg, profile))
    return cells


# ----------------------------------------------------------------------------- one cell


@dataclass
class CellResult:
    cell_id: str
    rows: list[ResultRow]
    seconds: float
    unavailable: list[dict] = field(default_factory=list)
    reused: bool = False
    units: list[UnitScores] = field(default_factory=list)  # per-document / per-example scores


def _manifest_matches(out: Path, cell: Cell) -> bool:
    """Whether ``out`` holds a finished compression of exactly this cell's settings."""
    from polyprune.compress.manifest import RunManifest
    from polyprune.models import resolve_model_path

    try:
        m = RunManifest.from_dir(out)
    except InputError:  # none, unreadable, or not a manifest: compress again
        return False
    cc = cell.compress_config()
    ok = m.method == cell.method and m.model == resolve_model_path(cell.model)
    if cell.method in PRUNE_METHODS:
        s = m.settings
        ok &= s.get("sparsity") == cell.sparsity and s.get("pattern") == cc["pattern"]
        ok &= s.get("sparsity_profile", "uniform") == cell.profile
        ok &= cell.profile == "uniform" or (s.get("owl_m"), s.get("owl_lambda")) == (
            cc["owl_m"], cc["owl_lambda"])  # fmt: skip
    else:
        q = m.quantization
        ok &= q is not None and q.bits == cell.bits and q.group_size == cc["group_size"]
    if cell.mix is not None:
        cal = m.calibration or {}
        want = {"mix": cell.mix, "seed": cell.seed, "nsamples": cc["nsamples"],
                "windows": WINDOWS_PROTOCOL,
                "seqlen": cc["seqlen"], "sampling": cc["sampling"]}  # fmt: skip
        ok &= all(cal.get(k) == v for k, v in want.items())
    ok &= m.settings.get("propagate", "compressed") == ("dense" if cell.swept else "compressed")
    return bool(ok)


def _compressed_model(cell: Cell, progress: bool):
    """(model, reused) for the cell: the dense model, a matching earlier output, or a new
    compression through ``polyprune.api``."""
    from polyprune.api import prune, quantize
    from polyprune.models import load_model

    cfg = cell.cfg
    if cell.method == "dense":
        return load_model(cell.model, cfg.device, cfg.dtype, tokenizer=False).model, False
    out = cell.compressed_dir() if cfg.keep_compressed else None
    if out is not None and _manifest_matches(out, cell):
        logger.info("%s: reusing %s", cell.label, out)
        return load_model(out, cfg.device, cfg.dtype, tokenizer=False).model, True
    cal = cfg.calibration
    kw = dict(
        calib=cell.mix, source=cal.source, nsamples=cal.nsamples, seqlen=cal.seqlen,
        seed=cell.seed or 0, sampling=cal.sampling, device=cfg.device, dtype=cfg.dtype,
        out=out, overwrite=True, progress=progress, format="dense",
        command=f"polyprune matrix ({cfg.name}: {cell.label})",
    )  # fmt: skip
    if cell.swept:  # what the sweep would have written for it
        kw["propagate"] = "dense"
    if cell.method in PRUNE_METHODS:
        # kept outputs carry their masks (bit-packed, 1/16 of bf16 weights) so that
        # `polyprune analyze` can compare them (IoU) without pruning again
        from polyprune.compress.profiles import OwlParams

        model, _ = prune(cell.model, cell.method, sparsity=cell.sparsity, pattern=cfg.pattern,
                         save_masks=out is not None, sparsity_profile=cell.profile,
                         owl=OwlParams(cfg.owl_m, cfg.owl_lambda), **kw)  # fmt: skip
    else:
        model, _ = quantize(cell.model, cell.method, bits=cell.bits,
                            group_size=cfg.group_size, **kw)  # fmt: skip
    return model, False


def analyse(model, tokenizer, cell: Cell) -> list[ResultRow]:
    """Model SNR (mean over layers, dB) and mean pruning error of the compressed model's hidden
    states against the dense model's, on held-out windows of each evaluation language: the
    ``snr`` and ``error`` metrics of ``polyprune analyze``, per language."""
    import torch

    from polyprune.analysis.hidden import compare_hidden_states
    from polyprune.data.heldout import heldout_stream
    from polyprune.data.windows import cut_windows, window_bos
    from polyprune.models import load_model, max_positions

    cfg, ppl = cell.cfg, cell.cfg.eval.ppl
    dense = load_model(cell.model, cfg.device, cfg.dtype, tokenizer=False).model
    seqlen = ppl.seqlen or min(max_positions(dense.config) or 2048, 2048)
    budget = ANALYSIS_WINDOWS * seqlen
    bos = window_bos(tokenizer)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.int64)
    rows = []
    for lang in cfg.eval.langs:
        stream = heldout_stream(tokenizer, lang, ppl.source, min(ppl.max_tokens or budget, budget))
        windows = cut_windows(stream, seqlen, bos)  # (N, T), BOS first where the model wants it
        n = windows.shape[0]
        if n == 0:
            raise InputError(f"too little held-out {lang} text for one {seqlen}-token window")
        keep = ~torch.isin(windows, special)  # as in analyze: BOS (a sink) would dominate
        stats = compare_hidden_states(dense, {"c": model}, windows, cfg.eval.batch_size,
                                      cfg.device, progress=False, keep=keep)["c"]  # fmt: skip
        tokens = int(keep.sum())
        for name in ANALYSES:  # the registry's order, as the rows have always been written
            if name in cfg.analyses:
                metric = get_metric(name)
                rows.append(ResultRow(name, lang, metric.row_metric, metric.model_value(stats),
                                      tokens))  # fmt: skip
    return rows


def run_cell(cell: Cell, progress: bool = False) -> CellResult:
    """Compress (or reuse) and evaluate one cell. Pure of the store: the caller writes it."""
    from polyprune.models import load_tokenizer

    t0 = time.perf_counter()
    model, reused = _compressed_model(cell, progress)
    tokenizer = load_tokenizer(cell.model)
    out = evaluate_cell(model, tokenizer, cell.cfg.eval, cell.cfg.device, progress)
    rows = out.rows
    if cell.cfg.analyses and cell.method != "dense":
        rows += analyse(model, tokenizer, cell)
    return CellResult(cell.cell_id, rows, time.perf_counter() - t0, out.unavailable, reused,
                      out.units)  # fmt: skip


# ----------------------------------------------------------------------------- executors


@dataclass
class MatrixReport:
    cells: list[Cell]
    done_before: list[Cell] = field(default_factory=list)
    ran: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, str]] = field(default_factory=list)


def _store_result(store: ResultStore, cell: Cell, result: CellResult, report: MatrixReport):
    store.write_cell(cell.cell_id, cell.label, cell.config(), cell.keys(), result.rows,
                     result.seconds, result.unavailable, result.units)  # fmt: skip
    report.ran.append(cell)
    logger.info("%s: %d rows in %.1f s", cell.label, len(result.rows), result.seconds)


def _run_local(cells, store, report, progress):
    for cell in tqdm(cells, desc="cells", disable=not progress):
        try:
            result = run_cell(cell, progress)
        except InputError as e:  # a setting only a real run finds out (e.g. too little text)
            logger.error("%s failed: %s", cell.label, e)
            report.failed.append((cell, str(e)))
            continue
        except Exception as e:  # e.g. CUDA out of memory: the other cells may still run
            logger.exception("%s failed", cell.label)
            report.failed.append((cell, f"{type(e).__name__}: {e}"))
            continue
        _store_result(store, cell, result, report)


def _run_ray(cells, cfg: MatrixConfig, store, report, progress):
    try:
        import ray
    except ImportError as e:
        raise InputError("--executor ray needs Ray (pip install 'polyprune[ray]')") from e
    ex = cfg.executor
    env = {k: os.environ[k] for k in _FORWARD_ENV if k in os.environ}
    started = not ray.is_initialized()
    if started:
        ray.init(address=ex.address, runtime_env={"env_vars": env}, log_to_driver=False,
                 include_dashboard=False)  # fmt: skip
    try:
        remote = ray.remote(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_retries=0)(run_cell)
        pending = {remote.remote(c): c for c in cells}
        with tqdm(total=len(cells), desc="cells", disable=not progress) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    cell = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # RayTaskError wraps the worker's exception
                        msg = str(e).strip().splitlines()[-1] if str(e).strip() else repr(e)
                        logger.error("%s failed: %s", cell.label, msg)
                        report.failed.append((cell, msg))
                    else:
                        _store_result(store, cell, result, report)
                    bar.update()
    finally:
        if started:
            ray.shutdown()


def sweep_cells(cells: list[Cell], progress: bool = True) -> int:
    """Write the models of the swept cells not on disk yet: one ``polyprune sweep`` per
    (model, method, sparsity, seed) over its mixes, each entry moved to its cell's folder.
    Returns how many sweeps ran."""
    import shutil

    from polyprune.data.mix import CalibrationMix
    from polyprune.eval.sweep import mix_dirname, sweep

    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.swept and not _manifest_matches(c.compressed_dir(), c):
            groups.setdefault((c.model, c.method, c.sparsity, c.seed), []).append(c)
    for (model, method, sparsity, seed), group in groups.items():
        cfg, cal = group[0].cfg, group[0].cfg.calibration
        mixes = {c.mix: CalibrationMix.parse(c.mix) for c in group}
        tmp = (
            Path(cfg.workdir) / "compressed" / f".sweep-{_digest([model, method, sparsity, seed])}"
        )
        logger.info("sweep: %s %s %g seed %s over %d mixes", model, method, sparsity, seed,
                    len(mixes))  # fmt: skip
        sweep(model, method, list(mixes.values()), sparsity=sparsity, pattern=cfg.pattern,
              source=cal.source, nsamples=cal.nsamples, seqlen=cal.seqlen, seed=seed or 0,
              sampling=cal.sampling, device=cfg.device, dtype=cfg.dtype, save_masks=True,
              out=tmp, overwrite=True, progress=progress,
              command=f"polyprune matrix ({cfg.name}: sweep)")  # fmt: skip
        for c in group:
            dest = c.compressed_dir()
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            (tmp / mix_dirname(mixes[c.mix])).rename(dest)
        shutil.rmtree(tmp)
    return len(groups)


def run_matrix(
    cfg: MatrixConfig, executor: str = "local", dry_run: bool = False, progress: bool = True
) -> MatrixReport:
    """Run the cells of ``cfg`` that the store does not hold yet."""
    if executor not in EXECUTORS:
        raise InputError(f"unknown executor {executor!r}; allowed: {', '.join(EXECUTORS)}")
    if executor == "local" and not dry_run:
        from polyprune.checks import check_device

        check_device(cfg.device)  # the config checked only the name; here the GPU must exist
    cells = expand(cfg)
    report = MatrixReport(cells)
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise InputError("config: the grid lists the same cell twice (repeated mix or seed?)")
    if dry_run and not cfg.store_path.is_file():  # a dry run creates nothing
        return report
    with ResultStore(cfg.store_path) as store:
        done = store.done_cells()
        report.done_before = [c for c in cells if c.cell_id in done]
        todo = [c for c in cells if c.cell_id not in done]
        logger.info("%s: %d cells, %d done, %d to run (%s)", cfg.name, len(cells),
                    len(report.done_before), len(todo), executor)  # fmt: skip
        if dry_run or not todo:
            return report
        if cfg.sweep:
            sweep_cells(todo, progress)
        if executor == "ray":
            _run_ray(todo, cfg, store, report, progress)
        else:
            _run_local(todo, store, report, progress)
    return report

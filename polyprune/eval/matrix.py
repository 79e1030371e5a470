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

Config (paths relative to the current directory)::

    name: demo
    workdir: runs/matrix-demo        # compressed models, store, tables
    store: results.sqlite            # default; relative to workdir
    models: [demo]
    methods: [wanda, sparsegpt]      # magnitude, wanda, sparsegpt, gptq, rtn
    sparsities: [0.5]                # pruning methods
    bits: [4]                        # quantisation methods
    group_size: 128
    pattern: unstructured
    mixes: [de, en, "de,en"]
    seeds: [0, 42, 1234]
    dense_baseline: true
    calibration: {source: bundled, nsamples: 128, seqlen: 2048, sampling: concat}
    eval:
      langs: [ar, de, en, es, ru, sw, zh]
      tasks: [ppl, belebele, nextsent]
      ppl: {source: bundled, seqlen: 2048, max_tokens: null}
      limit: null                    # lm-eval examples per task
      num_fewshot: null
      batch_size: 8
    device: cpu
    dtype: auto
    keep_compressed: true            # false: compress in memory, write nothing
    analyses: [snr, error]           # optional: hidden-state SNR / pruning error vs dense
    executor: {address: auto, num_cpus: 1, num_gpus: 1}   # Ray only
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from polyprune.compress.methods import get_method, method_names, methods
from polyprune.data.mix import WINDOWS_PROTOCOL
from polyprune.errors import InputError, shorten
from polyprune.eval.evaluate import EvalSettings, PplSettings, evaluate_cell
from polyprune.eval.store import ResultRow, ResultStore, UnitScores

__all__ = [
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "Cell",
    "CellResult",
    "MatrixConfig",
    "MatrixReport",
    "expand",
    "load_config",
    "run_cell",
    "run_matrix",
]

logger = logging.getLogger(__name__)

# From the method registry (polyprune.compress.methods), the one list of methods.
PRUNE_METHODS = method_names("prune")
QUANT_METHODS = method_names("quantize")
DATA_FREE = tuple(s.name for s in methods() if s.data_free)
# Diagnostics of compressed vs dense hidden states per evaluation language (polyprune.analysis)
ANALYSES = {"snr": "snr_db", "error": "pruning_error"}
ANALYSIS_WINDOWS = 16  # held-out windows per language: enough for stable layer sums
EXECUTORS = ("local", "ray")
# Environment a Ray worker needs to see as the driver does (offline flags, caches, mirrors).
_FORWARD_ENV = (
    "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME",
    "POLYPRUNE_CACHE", "POLYPRUNE_MC4_ROOT", "POLYPRUNE_MKQA", "POLYPRUNE_KERNELS",
)  # fmt: skip


# ----------------------------------------------------------------------------- config


_SCALARS = {"str": str, "int": int, "float": (int, float), "bool": bool, "None": type(None)}


def _take(section: str, raw, cls):
    """Check mapping ``raw`` against dataclass ``cls``: no unknown key, and scalar values of
    the annotated type (``int | None`` etc.); lists and sections are checked by the caller."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InputError(f"config: {section} must be a mapping, got {type(raw).__name__}")
    annotations = {f.name: str(f.type) for f in fields(cls)}
    where = f" in {section}" if section else ""
    for k, v in raw.items():
        if k not in annotations:
            allowed = ", ".join(annotations)
            raise InputError(f"config: unknown key {k!r}{where}; allowed: {allowed}")
        names = [t.strip() for t in annotations[k].split("|")]
        if not all(n in _SCALARS for n in names):
            continue
        ok = any(
            isinstance(v, _SCALARS[n]) and (n == "bool" or not isinstance(v, bool)) for n in names
        )
        if not ok:
            raise InputError(f"config: {k}{where} must be {annotations[k]}, got {v!r}")
    return raw


def _list(name: str, value, kind) -> tuple:
    value = [value] if isinstance(value, (str, int, float)) else value
    if not isinstance(value, (list, tuple)) or not value:
        raise InputError(f"config: {name} must be a non-empty list")
    for v in value:
        if not isinstance(v, kind) or isinstance(v, bool):
            what = "number" if kind == (int, float) else kind.__name__
            raise InputError(f"config: {name} entry {v!r} is not a {what}")
    return tuple(value)


@dataclass(frozen=True)
class CalibrationSettings:
    source: str = "bundled"
    nsamples: int = 128
    seqlen: int = 2048
    sampling: str = "concat"


@dataclass(frozen=True)
class ExecutorSettings:
    address: str = "auto"  # Ray: "auto" (a running cluster), "local" (start one), or host:port
    num_cpus: float = 1
    num_gpus: float = 0


@dataclass(frozen=True)
class MatrixConfig:
    name: str
    workdir: str
    models: tuple[str, ...]
    methods: tuple[str, ...]
    mixes: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    sparsities: tuple[float, ...] = (0.5,)
    bits: tuple[int, ...] = (4,)
    group_size: int = 128
    pattern: str = "unstructured"
    dense_baseline: bool = True
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    store: str = "results.sqlite"
    device: str = "cpu"
    dtype: str = "auto"
    keep_compressed: bool = True
    analyses: tuple[str, ...] = ()
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)

    @property
    def store_path(self) -> Path:
        return Path(self.workdir) / self.store

    @property
    def tables_dir(self) -> Path:
        return Path(self.workdir) / "tables"

    @classmethod
    def from_dict(cls, raw: dict) -> MatrixConfig:
        """Build and check the whole config; raises InputError on the first problem."""
        raw = dict(_take("", raw, cls))
        for required in ("name", "workdir", "models", "methods"):
            if required not in raw:
                raise InputError(f"config: missing key {required!r}")
        cal = CalibrationSettings(**_take("calibration", raw.pop("calibration", None),
                                          CalibrationSettings))  # fmt: skip
        ev = dict(_take("eval", raw.pop("eval", None), EvalSettings))
        ppl = PplSettings(**_take("eval.ppl", ev.pop("ppl", None), PplSettings))
        if "langs" not in ev:
            raise InputError("config: missing key 'langs' in eval")
        ev["langs"] = _list("eval.langs", ev["langs"], str)
        ev["tasks"] = _list("eval.tasks", ev.get("tasks", ["ppl"]), str)
        ex = ExecutorSettings(**_take("executor", raw.pop("executor", None), ExecutorSettings))
        raw["models"] = _list("models", raw["models"], str)
        raw["methods"] = _list("methods", raw["methods"], str)
        if raw.get("analyses") in ([], None):
            raw.pop("analyses", None)
        pairs = (("mixes", str), ("seeds", int), ("sparsities", float), ("bits", int),
                 ("analyses", str))  # fmt: skip
        for key, kind in pairs:
            if key in raw:
                kind = (int, float) if kind is float else kind
                raw[key] = _list(key, raw[key], kind)
        cfg = cls(**raw, calibration=cal, eval=EvalSettings(**ev, ppl=ppl), executor=ex)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Everything that can be checked without loading weights or running anything."""
        from polyprune.checks import check_device, check_dtype
        from polyprune.compress.masks import Pattern
        from polyprune.compress.quant import QuantConfig
        from polyprune.data.mix import CalibrationMix, check_calibration
        from polyprune.data.sources import get_source
        from polyprune.models import resolve_model_path

        for m in self.methods:
            try:
                get_method(m)
            except InputError as e:
                raise InputError(f"config: {e}") from None
        for model in self.models:
            resolve_model_path(model, convert=False)  # a GGUF is converted by the first cell
        for a in self.analyses:
            if a not in ANALYSES:
                raise InputError(f"config: unknown analysis {a!r}; allowed: {', '.join(ANALYSES)}")
        pattern = Pattern.parse(self.pattern)
        for s in self.sparsities:
            if not 0 <= s < 1:
                raise InputError(f"config: sparsity {s} is outside [0, 1)")
            if pattern.structured and abs(s - pattern.sparsity) > 1e-9:
                raise InputError(f"config: sparsity {s} does not match pattern {pattern}")
        for b in self.bits:
            QuantConfig(b, self.group_size)
        cal = self.calibration
        for seed in self.seeds:
            try:  # the same rules as the CLI's and the API's
                check_calibration(cal.nsamples, cal.seqlen, seed, cal.sampling)
            except InputError as e:
                raise InputError(f"config: {e}") from None
        check_device(self.device, available=False)  # the local executor checks the GPU
        check_dtype(self.dtype)
        _check_store(self.workdir, self.store)
        needs_data = any(m not in DATA_FREE for m in self.methods)
        if needs_data:
            if not self.mixes:
                raise InputError("config: methods that calibrate need mixes (e.g. [de, en])")
            src = get_source(cal.source)
            for text in self.mixes:
                mix = CalibrationMix.parse(text)
                mix.counts(cal.nsamples)
                for lang in mix.langs:
                    src.check_language(lang)
        if not self.seeds:
            raise InputError("config: seeds must not be empty")
        self.eval.check()
        if self.device.startswith("cuda") and self.executor.num_gpus == 0:
            logger.debug("device %s with executor.num_gpus 0 (fine for the local executor)",
                         self.device)  # fmt: skip


def _check_store(workdir: str, store: str) -> None:
    """The store lies inside the workdir: ``store: ../x.sqlite`` or an absolute path elsewhere
    would write (and, resumed, read) results outside the matrix's own directory."""
    root = Path(workdir).resolve()
    path = (root / store).resolve()
    if path == root or not path.is_relative_to(root):
        raise InputError(
            f"config: store {shorten(store)} is outside workdir {shorten(workdir)}; "
            "give a file name inside it, e.g. results.sqlite"
        )


def load_config(path: str | os.PathLike) -> MatrixConfig:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise InputError(f"config {path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise InputError(f"config {path}: expected a mapping at the top level")
    return MatrixConfig.from_dict(raw)


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

    @property
    def level(self) -> str:
        if self.method == "dense":
            return "dense"
        return f"{self.bits}bit" if self.bits is not None else f"{self.sparsity:g}"

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
        else:
            c |= {"bits": self.bits, "group_size": self.cfg.group_size}
        if self.mix is not None:
            c |= {"mix": self.mix, "seed": self.seed} | asdict(self.cfg.calibration)
        return c

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
            for sparsity, bits in levels:
                if method in DATA_FREE:
                    cells.append(Cell(model, method, sparsity, bits, None, None, cfg))
                    continue
                for mix in cfg.mixes:
                    for seed in cfg.seeds:
                        cells.append(Cell(model, method, sparsity, bits, mix, seed, cfg))
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
    else:
        q = m.quantization
        ok &= q is not None and q.bits == cell.bits and q.group_size == cc["group_size"]
    if cell.mix is not None:
        cal = m.calibration or {}
        want = {"mix": cell.mix, "seed": cell.seed, "nsamples": cc["nsamples"],
                "windows": WINDOWS_PROTOCOL,
                "seqlen": cc["seqlen"], "sampling": cc["sampling"]}  # fmt: skip
        ok &= all(cal.get(k) == v for k, v in want.items())
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
    if cell.method in PRUNE_METHODS:
        # kept outputs carry their masks (bit-packed, 1/16 of bf16 weights) so that
        # `polyprune analyze` can compare them (IoU) without pruning again
        model, _ = prune(cell.model, cell.method, sparsity=cell.sparsity, pattern=cfg.pattern,
                         save_masks=out is not None, **kw)  # fmt: skip
    else:
        model, _ = quantize(cell.model, cell.method, bits=cell.bits,
                            group_size=cfg.group_size, **kw)  # fmt: skip
    return model, False


def analyse(model, tokenizer, cell: Cell) -> list[ResultRow]:
    """Model SNR (mean over layers, dB) and mean pruning error of the compressed model's hidden
    states against the dense model's, on held-out windows of each evaluation language."""
    import torch

    from polyprune.analysis.hidden import compare_hidden_states
    from polyprune.analysis.snr import model_snr
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
        if "snr" in cfg.analyses:
            rows.append(ResultRow("snr", lang, "snr_db", model_snr(stats), tokens))
        if "error" in cfg.analyses:
            pe = sum(layer.pruning_error for layer in stats) / len(stats)
            rows.append(ResultRow("error", lang, "pruning_error", pe, tokens))
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
        if executor == "ray":
            _run_ray(todo, cfg, store, report, progress)
        else:
            _run_local(todo, store, report, progress)
    return report

"""The matrix config (``polyprune matrix CONFIG.yaml``): YAML -> :class:`MatrixConfig`, checked
whole before any work (unknown key, unknown method, bad mix, unknown language, ...).

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
    profiles: [uniform, owl]         # layer-wise sparsity (pruning methods it applies to)
    owl_m: 5                         # OWL's hyperparameters (docs/sparsity_profiles.md)
    owl_lambda: 0.08
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
    sweep: false                     # true: the pruned cells of a (model, method, sparsity,
                                     # seed) come from one `polyprune sweep` over all mixes
                                     # (dense propagation; needs keep_compressed)
    analyses: [snr, error]           # optional: hidden-state SNR / pruning error vs dense
    executor: {address: auto, num_cpus: 1, num_gpus: 1}   # Ray only
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from polyprune.analysis.metric import get_metric, metric_names
from polyprune.compress.methods import get_method, method_names, methods
from polyprune.errors import InputError, shorten
from polyprune.eval.evaluate import EvalSettings, PplSettings

__all__ = [
    "ANALYSES",
    "ANALYSIS_WINDOWS",
    "DATA_FREE",
    "PRUNE_METHODS",
    "QUANT_METHODS",
    "CalibrationSettings",
    "ExecutorSettings",
    "MatrixConfig",
    "load_config",
    "profile_applies",
]

logger = logging.getLogger(__name__)

# From the method registry (polyprune.compress.methods), the one list of methods.
PRUNE_METHODS = method_names("prune")
QUANT_METHODS = method_names("quantize")
DATA_FREE = tuple(s.name for s in methods() if s.data_free)
# Diagnostics of compressed vs dense hidden states per evaluation language: the analyze metrics
# that give one number per language (polyprune.analysis.metric), name -> result-row metric
ANALYSES = {n: m.row_metric for n in metric_names() if (m := get_metric(n)).row_metric}
ANALYSIS_WINDOWS = 16  # held-out windows per language: enough for stable layer sums


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
    profiles: tuple[str, ...] = ("uniform",)
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    dense_baseline: bool = True
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    store: str = "results.sqlite"
    device: str = "cpu"
    dtype: str = "auto"
    keep_compressed: bool = True
    sweep: bool = False
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
                 ("analyses", str), ("profiles", str))  # fmt: skip
        for key, kind in pairs:
            if key in raw:
                kind = (int, float) if kind is float else kind
                raw[key] = _list(key, raw[key], kind)
        cfg = cls(**raw, calibration=cal, eval=EvalSettings(**ev, ppl=ppl), executor=ex)
        cfg.check()
        return cfg

    def _check_profiles(self, pattern) -> None:
        """Every profile known, each applying to some pruning method, and possible at every
        sparsity of the methods it applies to (the same checks as the CLI's)."""
        from polyprune.compress.profiles import OwlParams, check_profile

        try:
            owl = OwlParams(self.owl_m, self.owl_lambda)
            for profile in self.profiles:
                users = [m for m in self.methods if profile_applies(profile, m)]
                if not users:
                    raise InputError(f"profile {profile} applies to none of the methods")
                for method, s in itertools.product(users, self.sparsities):
                    check_profile(profile, method, s, pattern.structured, owl)
        except InputError as e:
            raise InputError(f"config: {e}") from None
        for m in self.methods:
            if m in PRUNE_METHODS and not any(profile_applies(p, m) for p in self.profiles):
                raise InputError(f"config: none of the profiles applies to {m}")

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
        self._check_profiles(pattern)
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
        if self.sweep and not self.keep_compressed:
            raise InputError("config: sweep writes the compressed models into the workdir; "
                             "it needs keep_compressed: true")  # fmt: skip
        self.eval.check()
        if self.device.startswith("cuda") and self.executor.num_gpus == 0:
            logger.debug("device %s with executor.num_gpus 0 (fine for the local executor)",
                         self.device)  # fmt: skip


def profile_applies(profile: str, method: str) -> bool:
    """Whether ``profile`` (a registered sparsity profile) applies to ``method``."""
    from polyprune.compress.profiles import get_profile

    methods = get_profile(profile).methods
    return method in PRUNE_METHODS and (methods is None or method in methods)


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

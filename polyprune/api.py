"""The Python API: ``polyprune.prune`` and ``polyprune.quantize`` from a notebook or a script.

Both are thin wrappers over :func:`compress`, which checks every input before any work, builds
the calibration windows, runs the engine, and writes the output.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from polyprune import __version__
from polyprune.checks import check_device, check_dtype
from polyprune.compress.engine import EngineConfig, EngineReport, check_widths, compress_model
from polyprune.compress.export import FORMATS, CheckpointWriter, output_dtype, write_model
from polyprune.compress.manifest import QuantizationRecord, RunManifest
from polyprune.compress.masks import Pattern
from polyprune.compress.methods import get_method
from polyprune.compress.profiles import OwlParams, profile_settings
from polyprune.compress.quant import QuantConfig
from polyprune.compress.solver import PruneConfig
from polyprune.compress.stream import (
    compress_checkpoint,
    has_safetensors,
    local_checkpoint,
    parse_size,
)
from polyprune.data.mix import CalibrationMix, build_calibration_set, check_calibration
from polyprune.data.sources import get_source
from polyprune.errors import InputError
from polyprune.gguf import model_source
from polyprune.gptq_format import check_packable
from polyprune.models import (
    find_blocks,
    get_weight,
    linear_layers,
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_dtype,
    resolve_model_path,
    skeleton,
)
from polyprune.outputs import (
    check_not_source,
    check_output_dir,
    check_writable,
    output_lock,
    staged_output,
)

__all__ = ["compress", "model_dirs", "prune", "quantize"]

logger = logging.getLogger(__name__)


def prune(
    model,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    bits: int | None = None,
    group_size: int = 128,
    sym: bool = True,
    format: str = "dense",
    **kw,
) -> tuple[nn.Module, dict]:
    """Prune ``model`` (hub id, directory, ``demo``, or a loaded HF model) with calibration mix
    ``calib``; with ``bits`` (SparseGPT only) also quantise in the same pass. Returns the
    pruned model and its manifest; writes ``out`` if given. See :func:`compress` for the rest.
    """
    get_method(method, "prune")
    pat = Pattern.parse(pattern)
    if sparsity is None:  # N:M implies its sparsity; unstructured defaults to 50%
        sparsity = pat.sparsity if pat.structured else 0.5
    prune_cfg = PruneConfig(
        sparsity, pat, blocksize=kw.pop("blocksize", 128), percdamp=kw.pop("percdamp", 0.01)
    )
    quant = None
    if bits is not None:
        quant = QuantConfig(bits, group_size, sym, blocksize=prune_cfg.blocksize,
                            percdamp=prune_cfg.percdamp)  # fmt: skip
    return compress(model, method, prune_cfg=prune_cfg, quant=quant, format=format, **kw)


def quantize(
    model,
    method: str = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    static_groups: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    format: str = "gptq",
    **kw,
) -> tuple[nn.Module, dict]:
    """Quantise ``model`` with GPTQ (calibrated on ``calib``) or round-to-nearest. The model
    returned holds the dequantised weights; ``out`` gets the packed GPTQ checkpoint
    (``format="gptq"``) or an ordinary HF checkpoint of the dequantised weights (``"dense"``).
    """
    get_method(method, "quantize")
    quant = QuantConfig(bits, group_size, sym, act_order, static_groups, blocksize, percdamp)
    return compress(model, method, quant=quant, format=format, **kw)


def _check_widths(model: nn.Module, cfg: EngineConfig, format: str) -> None:
    """N:M patterns, quantisation groups and GPTQ packing against every Linear's widths."""
    check_widths(model, cfg)
    if format == "gptq":
        prefix, blocks = find_blocks(model)
        for b, block in enumerate(blocks):
            for name, mod in linear_layers(block).items():
                N, K = get_weight(mod).shape
                check_packable(K, N, cfg.quant.bits, f"{prefix}.{b}.{name}")


def _holding_output_lock(fn):
    """Hold ``out``'s lock for the whole call, from before any work: a second run on the same
    output fails at once instead of replacing the first's output at the end."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = sig.bind(*args, **kwargs).arguments.get("out")
        if out is None:
            return fn(*args, **kwargs)
        with output_lock(out):
            return fn(*args, **kwargs)

    return wrapper


def model_dirs(model) -> list[str]:
    """The local directory a model spec names (``demo`` included), if any."""
    if isinstance(model, nn.Module):
        return []
    spec = str(model)
    if spec == "demo":
        from polyprune.models import DEMO_MODEL_DIR

        return [str(DEMO_MODEL_DIR)]
    return [spec] if os.path.isdir(spec) else []


@dataclass
class _Target:
    """The model a run compresses, as far as known before its weights load."""

    model: nn.Module | None  # a model object given by the caller
    path: str | None  # its checkpoint otherwise
    config: object
    name: str
    tokenizer: object | None
    streaming: bool


@_holding_output_lock
def compress(
    model: str | os.PathLike | nn.Module,
    method: str,
    prune_cfg: PruneConfig | None = None,
    quant: QuantConfig | None = None,
    calib: str | CalibrationMix | None = "en",
    source: str = "bundled",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = "concat",
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    offload: str = "auto",
    offload_dir: str | None = None,
    stream: bool | str = False,
    max_shard_size: str | int = "5GB",
    true_sequential: bool = False,
    propagate: str = "compressed",
    sparsity_profile: str = "uniform",
    owl: OwlParams | None = None,
    tokenizer=None,
    out: str | os.PathLike | None = None,
    format: str = "dense",
    save_masks: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> tuple[nn.Module | None, dict]:
    """Compress ``model`` in place with ``method``; every input is checked before any work:
    an impossible setting fails in milliseconds, not after an hour of calibration.

    ``stream=True`` compresses a checkpoint on disk (a directory or hub id of safetensors) one
    decoder block at a time into ``out`` (output shards of at most ``max_shard_size``), so
    neither the model nor the output is ever whole in memory; the model returned is then None
    (load it from ``out``). ``stream="auto"`` streams whenever ``model`` is such a checkpoint
    and ``out`` is given. ``offload`` (auto, none, cpu, disk) places the calibration
    activations; disk memory-maps them in ``offload_dir``."""
    t0 = time.perf_counter()
    prune_cfg = prune_cfg or PruneConfig()
    engine_cfg = EngineConfig(
        method=method, prune=prune_cfg, device=device, batch_size=batch_size, offload=offload,
        offload_dir=offload_dir, true_sequential=true_sequential, propagate=propagate,
        keep_masks=save_masks, progress=progress, quant=quant, profile=sparsity_profile,
        owl=owl or OwlParams(),
    )  # fmt: skip
    mix = check_settings(engine_cfg, format, dtype, stream, calib, source, nsamples, seqlen,
                          seed, sampling)  # fmt: skip
    max_shard_bytes = parse_size(max_shard_size)
    if out is not None:
        check_output_dir(out, overwrite)
        check_not_source(out, model_dirs(model))
        check_writable(os.path.dirname(os.path.abspath(out)))
    target = _target(model, tokenizer, stream, out)
    _check_fits(target, engine_cfg, format, seqlen if mix is not None else None)

    timings: dict[str, float] = {}
    calib_set = None
    if mix is not None:
        t = time.perf_counter()
        calib_set = _calibration_set(target, mix, source, nsamples, seqlen, seed, sampling)
        timings["calibration_data"] = time.perf_counter() - t

    spec = _OutputSpec(format, quant, max_shard_bytes, save_masks)
    staged = staged_output(out, overwrite) if out is not None else contextlib.nullcontext()
    with staged as tmp:
        model, report, run_dtype, checkpoint_format = _run_engine(
            target, calib_set, engine_cfg, dtype, tmp, spec, timings
        )
        timings.update({f"engine_{k}": v for k, v in report.seconds.items()})
        manifest = build_manifest(engine_cfg, prune_cfg, quant, format, target.name, run_dtype,
                             calib_set, report, command, timings, target.streaming,
                             checkpoint_format)  # fmt: skip
        timings["total"] = time.perf_counter() - t0
        if tmp is not None:
            write_run_files(tmp, target.tokenizer, manifest)
    return model, manifest.to_dict()


def check_settings(
    cfg: EngineConfig, format: str, dtype: str, stream, calib, source: str, nsamples: int,
    seqlen: int, seed: int, sampling: str,
) -> CalibrationMix | None:  # fmt: skip
    """Every setting that needs neither the model nor the text; returns the calibration mix
    (None for a data-free method)."""
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    if format == "gptq" and cfg.quant is None:
        raise InputError("--format gptq needs quantised weights (--bits with sparsegpt)")
    check_device(cfg.device)
    check_dtype(dtype)
    if stream not in (True, False, "auto"):
        raise InputError(f"stream must be True, False or 'auto', not {stream!r}")
    if get_method(cfg.method).data_free:
        return None
    check_calibration(nsamples, seqlen, seed, sampling)
    if calib is None:
        raise InputError(f"method {cfg.method} needs a calibration mix (--calib)")
    mix = calib if isinstance(calib, CalibrationMix) else CalibrationMix.parse(calib)
    mix.counts(nsamples)
    src = get_source(source)
    for lang in mix.langs:
        src.check_language(lang)
    return mix


def _target(model, tokenizer, stream, out) -> _Target:
    """The model's config (max positions) and tokenizer, before its weights load."""
    if isinstance(model, nn.Module):
        config = model.config
        name = getattr(config, "name_or_path", None) or type(model).__name__
        return _Target(model, None, config, name, tokenizer,
                       _streaming(stream, None, config, out))  # fmt: skip
    path = resolve_model_path(model)
    config = load_config(path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    streaming = _streaming(stream, path, config, out)
    if streaming:
        path = local_checkpoint(path)
    return _Target(None, path, config, path, tokenizer, streaming)


def _check_fits(target: _Target, cfg: EngineConfig, format: str, seqlen: int | None) -> None:
    """Settings against the model's config and Linears (its skeleton: no weights)."""
    limit = max_positions(target.config)
    if seqlen is not None and limit is not None and seqlen > limit:
        raise InputError(f"seqlen {seqlen} is above the model's maximum positions ({limit})")
    model = target.model if target.model is not None else skeleton(target.config)
    _check_widths(model, cfg, format)


def _calibration_set(target: _Target, mix, source, nsamples, seqlen, seed, sampling):
    if target.tokenizer is None:
        raise InputError("a tokenizer is needed to calibrate a model object; pass tokenizer=")
    calib_set = build_calibration_set(mix, target.tokenizer, source, nsamples, seqlen, seed,
                                      sampling)  # fmt: skip
    logger.info(
        "calibration: %s (%s), %d x %d tokens, %s sampling, fingerprint %s",
        calib_set.mix, ", ".join(f"{k} {v}" for k, v in calib_set.counts.items()),
        calib_set.nsamples, seqlen, sampling, calib_set.fingerprint,
    )  # fmt: skip
    return calib_set


@dataclass(frozen=True)
class _OutputSpec:
    format: str
    quant: QuantConfig | None
    max_shard_bytes: int
    save_masks: bool

    def writer(self, directory: Path, source_dtype, run_dtype: torch.dtype) -> CheckpointWriter:
        dtype = output_dtype(self.format, self.quant, source_dtype, run_dtype)
        return CheckpointWriter(directory, self.format, dtype, self.quant, self.max_shard_bytes,
                                self.save_masks)  # fmt: skip


def _run_engine(
    target: _Target, calib_set, cfg: EngineConfig, dtype: str, tmp: Path | None,
    spec: _OutputSpec, timings: dict[str, float],
) -> tuple[nn.Module | None, EngineReport, torch.dtype, str | None]:  # fmt: skip
    """Compress the model and, with an output folder ``tmp``, write its weights there:
    streamed block by block, or loaded (unless given), compressed and written. Returns the
    model (None when streamed), the engine's report, the run dtype and the GPTQ format."""
    ids, langs = (calib_set.input_ids, calib_set.langs) if calib_set else (None, None)
    if target.streaming:
        source_dtype = checkpoint_dtype(target.config)
        run_dtype = resolve_dtype(dtype, cfg.device, source_dtype)
        if run_dtype == "auto":
            run_dtype = source_dtype or torch.float32
        writer = spec.writer(tmp, source_dtype, run_dtype)
        result = compress_checkpoint(target.path, ids, cfg, writer, run_dtype, __version__, langs)
        return None, result.report, run_dtype, result.checkpoint_format
    model, source_dtype = target.model, None
    if model is None:
        t = time.perf_counter()
        loaded = load_model(target.path, device=cfg.device, dtype=dtype, tokenizer=False)
        model, source_dtype = loaded.model, loaded.source_dtype
        timings["load"] = time.perf_counter() - t
    report = compress_model(model, ids, cfg, langs)
    run_dtype, checkpoint_format = next(model.parameters()).dtype, None
    if tmp is not None:
        t = time.perf_counter()
        writer = spec.writer(tmp, source_dtype, run_dtype)
        checkpoint_format = write_model(model, writer, report.quant, report.masks, __version__)
        timings["export"] = time.perf_counter() - t
    return model, report, run_dtype, checkpoint_format


def write_run_files(directory: Path, tokenizer, manifest: RunManifest) -> None:
    """What every output holds beside its weights: the tokenizer and the manifest."""
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    manifest.write(directory)


def _streaming(stream: bool | str, path: str | None, config, out) -> bool:
    """Whether to stream, with a clear refusal where it cannot."""
    if stream is False:
        return False
    gptq_source = isinstance(getattr(config, "quantization_config", None), dict)
    if stream == "auto":
        local = path is not None and os.path.isdir(path)
        return (
            out is not None
            and not gptq_source
            and path is not None
            and (has_safetensors(path) if local else True)
        )
    if path is None:
        raise InputError("streaming reads a checkpoint from disk: pass its path, not a model")
    if out is None:
        raise InputError("streaming writes the compressed model to disk: give an output (--out)")
    if gptq_source:
        raise InputError("a quantised checkpoint cannot be streamed; use --no-stream")
    return True


def checkpoint_dtype(config) -> torch.dtype | None:
    src = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return src if isinstance(src, torch.dtype) else getattr(torch, str(src), None)


def _setting(key: str, prune_cfg: PruneConfig, quant: QuantConfig | None):
    """The value of manifest setting ``key`` (a method's ``settings``); the column block and
    damping are the quantiser's when there is one (joint SparseGPT + GPTQ)."""
    if key == "sparsity":
        return prune_cfg.sparsity
    if key == "pattern":
        return str(prune_cfg.pattern)
    return getattr(quant or prune_cfg, key)


def build_manifest(
    engine_cfg: EngineConfig, prune_cfg: PruneConfig, quant: QuantConfig | None, format: str,
    model_name, run_dtype: torch.dtype, calib_set, report, command: str | None,
    timings: dict[str, float], streamed: bool = False, checkpoint_format: str | None = None,
) -> RunManifest:  # fmt: skip
    spec = get_method(engine_cfg.method)
    settings = {
        "true_sequential": engine_cfg.true_sequential,
        "batch_size": engine_cfg.batch_size,
        "device": engine_cfg.device,
        "offload": engine_cfg.offload,
        "dtype": str(run_dtype).removeprefix("torch."),
    }
    settings.update({k: _setting(k, prune_cfg, quant) for k in spec.settings})
    # recorded only where they differ from the default, so older manifests still compare equal
    extra = {"stream": True if streamed else None, "propagate": engine_cfg.propagate,
             **profile_settings(engine_cfg.profile, engine_cfg.owl)}  # fmt: skip
    settings.update({k: v for k, v in extra.items() if v not in (None, "compressed")})
    return RunManifest(
        tool="polyprune",
        version=__version__,
        command=command or f"polyprune.{spec.kind}()",
        model=str(model_name),
        # e.g. a GGUF converted in the cache: which file, which quantisation (Q4_K_M, ...)
        source=model_source(model_name),
        kind=spec.kind,
        method=spec.name,
        settings=settings,
        quantization=None if quant is None else QuantizationRecord(
            quant.bits, quant.group_size, quant.sym, quant.act_order, quant.static_groups, format,
            checkpoint_format,
        ),
        calibration=calib_set.manifest() if calib_set else None,
        profile=report.profile,
        achieved_sparsity=report.overall_sparsity(),
        layers={
            r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in report.layers
        },
        seconds=timings,
        environment={
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    )  # fmt: skip

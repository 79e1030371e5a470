"""The Python API: ``polyprune.prune`` from a notebook or a script."""

from __future__ import annotations

import logging
import os
import platform
import sys
import time
from dataclasses import asdict

import torch
from torch import nn

from polyprune.compress.engine import METHODS, EngineConfig, compress_model
from polyprune.compress.export import check_output_dir, save_compressed
from polyprune.compress.masks import Pattern
from polyprune.compress.solver import PruneConfig
from polyprune.data.mix import SAMPLING_MODES, CalibrationMix, build_calibration_set
from polyprune.data.sources import get_source
from polyprune.errors import InputError
from polyprune.models import (
    load_config,
    load_model,
    load_tokenizer,
    max_positions,
    resolve_model_path,
)

__all__ = ["prune"]

logger = logging.getLogger(__name__)


def _version() -> str:
    from polyprune import __version__

    return __version__


def prune(
    model: str | os.PathLike | nn.Module,
    method: str = "sparsegpt",
    sparsity: float | None = None,
    pattern: str = "unstructured",
    calib: str | CalibrationMix | None = "en",
    source: str = "bundled",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    sampling: str = "concat",
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 8,
    offload: str = "none",
    true_sequential: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
    tokenizer=None,
    out: str | os.PathLike | None = None,
    save_masks: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> tuple[nn.Module, dict]:
    """Prune ``model`` (hub id, directory, ``demo``, or a loaded HF model) with calibration
    mix ``calib``. Returns the pruned model and its manifest; writes ``out`` if given.

    Every argument is checked before any work: an impossible setting fails in milliseconds,
    not after an hour of calibration.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
    pat = Pattern.parse(pattern)
    if sparsity is None:  # N:M implies its sparsity; unstructured defaults to 50%
        sparsity = pat.sparsity if pat.structured else 0.5
    cfg = PruneConfig(
        sparsity=sparsity,
        pattern=pat,
        blocksize=blocksize,
        percdamp=percdamp,
    )
    if sampling not in SAMPLING_MODES:
        raise InputError(
            f"unknown sampling mode {sampling!r}; allowed: {', '.join(SAMPLING_MODES)}"
        )
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but torch sees no CUDA device")
    needs_data = METHODS[method].stat is not None
    mix = None
    if needs_data:
        if calib is None:
            raise InputError(f"method {method} needs a calibration mix (--calib)")
        mix = calib if isinstance(calib, CalibrationMix) else CalibrationMix.parse(calib)
        mix.counts(nsamples)
        src = get_source(source)
        for lang in mix.langs:
            src.check_language(lang)
    if out is not None:
        check_output_dir(out, overwrite)

    # Everything that can be wrong with the input is checked before the weights are loaded:
    # config (max positions), tokenizer, then the calibration windows (too little text).
    timings: dict[str, float] = {}
    path = None
    if isinstance(model, nn.Module):
        config = model.config
        model_name = getattr(config, "name_or_path", None) or type(model).__name__
    else:
        path = resolve_model_path(model)
        config, model_name = load_config(path), path
        if tokenizer is None:
            tokenizer = load_tokenizer(path)
    limit = max_positions(config)
    if needs_data and limit is not None and seqlen > limit:
        raise InputError(f"seqlen {seqlen} is above the model's maximum positions ({limit})")

    calib_set = None
    if needs_data:
        if tokenizer is None:
            raise InputError("a tokenizer is needed to calibrate a model object; pass tokenizer=")
        t = time.perf_counter()
        calib_set = build_calibration_set(mix, tokenizer, source, nsamples, seqlen, seed, sampling)
        timings["calibration_data"] = time.perf_counter() - t
        logger.info(
            "calibration: %s (%s), %d x %d tokens, %s sampling, fingerprint %s",
            calib_set.mix,
            ", ".join(f"{k} {v}" for k, v in calib_set.counts.items()),
            calib_set.nsamples,
            seqlen,
            sampling,
            calib_set.fingerprint,
        )

    source_dtype = None
    if path is not None:
        t = time.perf_counter()
        loaded = load_model(path, device=device, dtype=dtype, tokenizer=False)
        model, source_dtype = loaded.model, loaded.source_dtype
        timings["load"] = time.perf_counter() - t

    engine_cfg = EngineConfig(
        method=method,
        prune=cfg,
        device=device,
        batch_size=batch_size,
        offload=offload,
        true_sequential=true_sequential,
        keep_masks=save_masks,
        progress=progress,
    )
    report = compress_model(model, calib_set.input_ids if calib_set else None, engine_cfg)
    timings.update({f"engine_{k}": v for k, v in report.seconds.items()})

    manifest = {
        "tool": "polyprune",
        "version": _version(),
        "command": command or "polyprune.prune()",
        "model": str(model_name),
        "kind": "prune",
        "method": method,
        "settings": {
            "sparsity": cfg.sparsity,
            "pattern": str(cfg.pattern),
            "true_sequential": true_sequential,
            "batch_size": batch_size,
            "device": device,
            "offload": offload,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            **({"blocksize": blocksize, "percdamp": percdamp} if method == "sparsegpt" else {}),
        },
        "calibration": calib_set.manifest() if calib_set else None,
        "achieved_sparsity": report.overall_sparsity(),
        "layers": {
            r.name: {k: v for k, v in asdict(r).items() if k != "name"} for r in report.layers
        },
        "seconds": timings,
        "environment": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "platform": platform.platform(),
        },
    }
    if out is not None:
        t = time.perf_counter()
        save_compressed(
            model,
            tokenizer,
            out,
            manifest,
            masks=report.masks if save_masks else None,
            overwrite=overwrite,
            dtype=source_dtype,
        )
        manifest["seconds"]["export"] = time.perf_counter() - t
    manifest["seconds"]["total"] = time.perf_counter() - t0
    return model, manifest

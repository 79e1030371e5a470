"""The packed GPTQ checkpoint format read by GPTQModel, vLLM and transformers.

Per quantised Linear with K inputs, N outputs, b bits and G groups (layout as in AutoGPTQ's
``qlinear_cuda.pack`` and GPTQModel's ``PackableQuantLinear``):

* ``qweight`` int32 [K * b / 32, N]: the integers packed along the input dimension, lowest bits
  first (row r holds inputs r * 32/b + j at bit b * j); 3 bits use GPTQ's 10|1|10|1|10 layout
  of 32 values in 3 words.
* ``qzeros`` int32 [G, N * b / 32]: zero points packed the same way along the output
  dimension. In checkpoint format ``gptq`` (v1) the stored value is zero - 1 and readers add
  1 back; in ``gptq_v2`` it is the zero itself. Symmetric grids are written as v1 (their
  zero is the grid's midpoint, never 0); asymmetric grids always as v2
  (:func:`polyprune.compress.export.gptq_checkpoint_format`): v1 cannot hold a zero of 0,
  and GPTQModel (7.7.0) refuses asymmetric v1 unless it made the checkpoint itself.
* ``scales`` fp16 [G, N]; ``g_idx`` int32 [K], the group of each input column; ``bias`` fp16.

Dequantisation: W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n]).

A file format, beside ``weights.py`` and ``gguf.py`` below ``compress``: ``models`` reads GPTQ
checkpoints with it (:func:`load_gptq_state`). Packing a quantised Linear from its grids
(:func:`polyprune.compress.export.pack_linear`) belongs to the writer, which knows the grids.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from polyprune.errors import InputError

__all__ = [
    "check_packable",
    "dequantize",
    "gptq_quantization_config",
    "load_gptq_state",
    "pack_cols",
    "pack_rows",
    "unpack_cols",
    "unpack_rows",
]

logger = logging.getLogger(__name__)


def check_packable(in_features: int, out_features: int, bits: int, where: str) -> None:
    """The widths the packed layout can hold: b * width divisible by 32 (3 bits: width % 32)."""
    for what, width in (("input", in_features), ("output", out_features)):
        if (width * bits) % 32 or (bits == 3 and width % 32):
            need = 32 if bits == 3 else 32 // bits
            raise InputError(
                f"the GPTQ format packs {bits}-bit weights of widths divisible by {need}; the "
                f"{what} width of {where} is {width}; use --format dense"
            )


def _pack3(values: torch.Tensor) -> torch.Tensor:
    """(M, 32*k) 3-bit values -> (M, 3*k) int32 in GPTQ's 10|1|10|1|10 layout, along dim 1."""
    M, L = values.shape
    v = values.to(torch.int64).reshape(M, L // 32, 32)
    shifts = lambda off: torch.tensor([3 * j + off for j in range(10)], dtype=torch.int64)
    w0 = (v[..., 0:10] << shifts(0)).sum(-1) | ((v[..., 10] & 0x3) << 30)
    w1 = ((v[..., 10] >> 2) & 1) | (v[..., 11:21] << shifts(1)).sum(-1) | ((v[..., 21] & 1) << 31)
    w2 = ((v[..., 21] >> 1) & 0x3) | (v[..., 22:32] << shifts(2)).sum(-1)
    words = torch.stack([w0, w1, w2], dim=-1).reshape(M, 3 * (L // 32))
    return _to_int32(words)


def _unpack3(words: torch.Tensor) -> torch.Tensor:
    M, W = words.shape
    w = words.to(torch.int64).reshape(M, W // 3, 3) & 0xFFFFFFFF
    j = torch.arange(10, dtype=torch.int64)
    a = (w[..., 0:1] >> (3 * j)) & 0x7
    v10 = ((w[..., 0] >> 30) & 0x3) | ((w[..., 1] & 1) << 2)
    b = (w[..., 1:2] >> (3 * j + 1)) & 0x7
    v21 = ((w[..., 1] >> 31) & 1) | ((w[..., 2] & 0x3) << 1)
    c = (w[..., 2:3] >> (3 * j + 2)) & 0x7
    vals = torch.cat([a, v10.unsqueeze(-1), b, v21.unsqueeze(-1), c], dim=-1)
    return vals.reshape(M, 32 * (W // 3)).to(torch.int32)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> the same bits as int32."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (K, N) integers along dim 0 -> (K * bits / 32, N) int32."""
    return pack_cols(q.t().contiguous(), bits).t().contiguous()


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_cols(packed.t().contiguous(), bits).t().contiguous()


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (M, L) integers along dim 1 -> (M, L * bits / 32) int32, lowest bits first."""
    if bits == 3:
        return _pack3(q)
    per = 32 // bits
    M, L = q.shape
    v = q.to(torch.int64).reshape(M, L // per, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    return _to_int32((v << shifts).sum(-1))


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 3:
        return _unpack3(packed)
    per = 32 // bits
    M, W = packed.shape
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    vals = (w.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return vals.reshape(M, W * per).to(torch.int32)


def dequantize(tensors: dict[str, torch.Tensor], bits: int, v2: bool) -> torch.Tensor:
    """Dense weight (N, K) float32 of one packed Linear."""
    q = unpack_rows(tensors["qweight"], bits)  # (K, N)
    zeros = unpack_cols(tensors["qzeros"], bits) + (0 if v2 else 1)  # (G, N)
    g = tensors["g_idx"].long()
    scales = tensors["scales"].float()
    return (scales[g] * (q - zeros[g]).float()).t().contiguous()


def gptq_quantization_config(cfg, v2: bool, version: str) -> dict:
    """``quantization_config`` for config.json and quantize_config.json."""
    return {
        "quant_method": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "desc_act": cfg.act_order,
        "sym": cfg.sym,
        "static_groups": cfg.static_groups,
        "damp_percent": cfg.percdamp,
        "true_sequential": True,
        "lm_head": False,
        "checkpoint_format": "gptq_v2" if v2 else "gptq",
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"polyprune:{version}"]},
    }


def load_gptq_state(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """The state dict of a GPTQ checkpoint with every packed Linear dequantised to ``weight``."""
    from safetensors.torch import load_file

    qc = config["quantization_config"]
    bits = int(qc["bits"])
    v2 = qc.get("checkpoint_format", qc.get("format", "gptq")) == "gptq_v2"
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.is_file()
        else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(path / f)))
    for key in [k for k in state if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        parts = {s: state.pop(f"{prefix}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        state[f"{prefix}.weight"] = dequantize(parts, bits, v2)
    return state

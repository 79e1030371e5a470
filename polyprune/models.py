"""Load a causal LM by hub id, local directory or ``demo``; find its decoder blocks and Linears.

Nothing here is per model family: the decoder blocks are the longest ``nn.ModuleList`` whose
entries all have the same class and hold Linear layers; the Linears of a block are its
``nn.Linear`` and GPT-2-style ``Conv1D`` sub-modules (weight stored transposed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polyprune.errors import InputError, cut, shorten
from polyprune.weights import check_weight_files, drop_ignorable, fit_error, tied_names

__all__ = [
    "DEMO_MODEL_DIR",
    "LoadedModel",
    "find_blocks",
    "get_weight",
    "is_linear",
    "linear_layers",
    "load_config",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "resolve_dtype",
    "resolve_model_path",
    "set_weight",
    "skeleton",
]

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo"


def resolve_model_path(spec: str | os.PathLike) -> str:
    """``demo`` -> the bundled model; ``gemma-3-270m`` (a named offline model) or a ``.gguf``
    file or a folder holding one -> its HF checkpoint converted once into the cache (see
    polyprune.gguf); an existing HF directory -> itself; ``org/name`` -> hub id."""
    from polyprune import gguf

    spec = str(spec)
    if spec == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise InputError(
                f"the demo model is missing from {DEMO_MODEL_DIR}; reinstall polyprune"
            )
        return str(DEMO_MODEL_DIR)
    if spec in gguf.NAMED_MODELS:
        return gguf.resolve_named(spec)
    if os.path.exists(spec):
        if gguf.find_gguf(spec) is not None:
            return gguf.resolve_gguf(spec)
        if not os.path.isdir(spec) or not os.path.isfile(os.path.join(spec, "config.json")):
            raise InputError(
                f"model path {spec!r} is not a directory with a config.json, a .gguf file or "
                "a directory with one"
            )
        return spec
    parts = spec.split("/")
    looks_like_hub_id = (
        len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and "\\" not in spec
    )
    if not looks_like_hub_id:
        named = ", ".join(gguf.NAMED_MODELS)
        raise InputError(
            f"model path {spec!r} does not exist (expected a local directory, a .gguf file, a "
            f"hub id such as meta-llama/Meta-Llama-3-8B, demo or {named})"
        )
    return spec


def _dtype(name: str | torch.dtype | None, device: str) -> torch.dtype | str:
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        # CPUs run fp16/bf16 matmuls slowly and with low precision: compress in fp32 there.
        return torch.float32 if device == "cpu" else "auto"
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise InputError(f"unknown dtype {name!r}; allowed: auto, {', '.join(table)}")
    return table[name]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object | None
    path: str
    source_dtype: torch.dtype  # the checkpoint's dtype, used again on export


def load_config(spec: str | os.PathLike):
    """The model's config only (no weights): cheap, for checking settings before any work."""
    from transformers import AutoConfig

    path = resolve_model_path(spec)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise InputError(f"could not load model {path!r}: {str(e).splitlines()[0]}") from e


# Files one of which a local model directory needs for AutoTokenizer to build a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "vocab.txt", "tokenizer.tiktoken")  # fmt: skip


def load_tokenizer(spec: str | os.PathLike):
    from transformers import AutoTokenizer

    path = resolve_model_path(spec)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        if os.path.isdir(path) and not any(
            os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES
        ):
            raise InputError(
                f"model directory {shorten(path)} has no tokenizer (none of "
                f"{', '.join(_TOKENIZER_FILES)}); copy its base model's tokenizer files into it"
            ) from e
        # transformers' messages run over several lines: all of them, joined, cut if long.
        msg = cut(" ".join(str(e).split()), 300) if str(e).strip() else type(e).__name__
        raise InputError(f"could not load the tokenizer of {shorten(path)}: {msg}") from e


def load_model(
    spec: str | os.PathLike,
    device: str = "cpu",
    dtype: str | torch.dtype | None = "auto",
    tokenizer: bool = True,
) -> LoadedModel:
    """Load model (and tokenizer) on CPU; the engine moves one block at a time to ``device``.

    A damaged weight file, or weights that do not fit the config (missing, unknown or of
    other shapes), is an InputError: transformers would fill the gaps with random weights."""
    path = resolve_model_path(spec)
    config = load_config(path)
    src = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    source_dtype = src if isinstance(src, torch.dtype) else getattr(torch, str(src), None)
    qc = getattr(config, "quantization_config", None)
    if os.path.isdir(path):
        check_weight_files(path)
    try:
        if isinstance(qc, dict) and qc.get("quant_method") == "gptq":
            model = _load_gptq_dense(path, config, _dtype(dtype, device))
        else:
            model = _from_pretrained(path, _dtype(dtype, device))
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"could not load model {path!r}: {str(e).splitlines()[0]}") from e
    model.eval()
    tok = load_tokenizer(path) if tokenizer else None
    if not isinstance(source_dtype, torch.dtype):
        source_dtype = next(model.parameters()).dtype
    return LoadedModel(model, tok, path, source_dtype)


class _HoldLoadReport(logging.Filter):
    """Holds back transformers' table of missing / unexpected weights: they are an error here,
    said in one line; a report of anything else is passed on afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.held.append(record)
            return False
        return True


def _from_pretrained(path: str, dtype) -> nn.Module:
    """``from_pretrained`` that refuses weights which do not fit the config."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    hf_logger = logging.getLogger("transformers.modeling_utils")
    hold = _HoldLoadReport()
    hf_logger.addFilter(hold)
    try:
        # Mismatched shapes come back in the loading info (not as a bare RuntimeError that
        # points at the report), to be refused below with the others.
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except SafetensorError as e:  # a hub download; local files were checked before
        raise InputError(f"a weight file of {path!r} is not readable: {e}") from e
    finally:
        hf_logger.removeFilter(hold)
    mismatched = sorted(str(k[0] if isinstance(k, tuple) else k) for k in info["mismatched_keys"])
    missing, unexpected = drop_ignorable(model, info["missing_keys"], info["unexpected_keys"])
    error = fit_error(f"model {path!r}", model, missing, unexpected, mismatched)
    if error is None and info.get("error_msgs"):
        error = InputError(f"model {path!r}: {str(info['error_msgs'][0]).splitlines()[0]}")
    if error is not None:
        raise error
    for record in hold.held:
        hf_logger.handle(record)
    return model


def _load_gptq_dense(path: str, config, dtype) -> nn.Module:
    """A packed GPTQ checkpoint as an ordinary model with dequantised weights, on CPU: no GPU
    kernel is needed to evaluate or analyse it."""
    import json

    from transformers import AutoModelForCausalLM

    from polyprune.compress.gptq_format import load_gptq_state

    raw = json.loads((Path(path) / "config.json").read_text())
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).float()  # exact dequantised values
    state = load_gptq_state(Path(path), raw)
    absent, unknown = model.load_state_dict(state, strict=False)
    missing, unexpected = drop_ignorable(model, absent, unknown)
    error = fit_error(f"GPTQ checkpoint {path!r}", model, missing, unexpected)
    if error is not None:
        raise error
    if set(absent) & tied_names(model):  # a tied lm_head left out of the checkpoint
        model.tie_weights()
    model = model.to(torch.float16 if dtype == "auto" else dtype).eval()
    model.config.quantization_config_source = raw["quantization_config"]
    return model


def max_positions(config) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as (out_features, in_features), whatever the layer stores."""
    W = module.weight.data
    return W.t() if type(module).__name__ == "Conv1D" else W


def set_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write W (out_features, in_features) back in place, in the layer's dtype and layout."""
    if type(module).__name__ == "Conv1D":
        W = W.t()
    module.weight.data.copy_(W.to(module.weight.dtype))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the longest ModuleList of same-class modules that contain Linears."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(is_linear(m) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise InputError(f"found no decoder blocks in {type(model).__name__}")
    return best


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Linear sub-layers of a block by their name relative to the block."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def resolve_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """The dtype ``--dtype name`` runs in on ``device``: a torch dtype, or "auto" (the
    checkpoint's own). The public name of the rule ``load_model`` applies."""
    return _dtype(name, device)


def skeleton(config) -> nn.Module:
    """The model's modules on the meta device: shapes without weights, in milliseconds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)

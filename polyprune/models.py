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
    "FAST_DTYPES_ENV",
    "LoadedModel",
    "find_blocks",
    "get_weight",
    "is_linear",
    "linear_layers",
    "load_config",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "cpu_flags",
    "fast_cpu_dtypes",
    "fast_dtypes_from_flags",
    "resolve_dtype",
    "resolve_model_path",
    "set_weight",
    "skeleton",
]

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).parent / "assets" / "demo"


def resolve_model_path(spec: str | os.PathLike, convert: bool = True) -> str:
    """``demo`` -> the bundled model; ``gemma-3-270m`` (a named offline model) or a ``.gguf``
    file or a folder holding one -> its HF checkpoint converted once into the cache (see
    polyprune.gguf); an existing HF directory -> itself; ``org/name`` -> hub id.

    ``convert=False`` checks a GGUF or named model without converting it (minutes the first
    time) and returns ``spec`` itself: for checks before any work, such as ``--dry-run``."""
    from polyprune import gguf

    spec = str(spec)
    if spec == "demo":
        if not (DEMO_MODEL_DIR / "config.json").is_file():
            raise InputError(
                f"the demo model is missing from {DEMO_MODEL_DIR}; reinstall polyprune"
            )
        return str(DEMO_MODEL_DIR)
    if spec in gguf.NAMED_MODELS:
        if not convert:
            gguf.check_named(spec)
            return spec
        return gguf.resolve_named(spec)
    if os.path.exists(spec):
        if gguf.find_gguf(spec) is not None:
            if not convert:
                gguf.check_gguf(spec)
                return spec
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


# CPU features that make a 16-bit matmul faster than fp32 in PyTorch's CPU kernels (oneDNN):
# x86 AVX512-BF16 / AMX-BF16 for bfloat16, AVX512-FP16 / AMX-FP16 for float16. Without them
# PyTorch converts 16-bit operands to fp32 internally, and a 16-bit forward is slower, not faster.
_FAST_CPU_FLAGS = {
    torch.bfloat16: ("avx512_bf16", "amx_bf16"),
    torch.float16: ("avx512_fp16", "amx_fp16"),
}


def fast_dtypes_from_flags(flags: set[str]) -> frozenset[torch.dtype]:
    """The 16-bit dtypes a CPU with these ``/proc/cpuinfo`` flags multiplies fast."""
    return frozenset(dt for dt, need in _FAST_CPU_FLAGS.items() if flags & set(need))


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


FAST_DTYPES_ENV = "POLYPRUNE_FAST_CPU_DTYPES"


def fast_cpu_dtypes() -> frozenset[torch.dtype]:
    """16-bit dtypes this CPU runs matmuls in faster than fp32: detected from its feature flags,
    deterministically, so that the same command runs in the same dtype on the same machine.
    ``POLYPRUNE_FAST_CPU_DTYPES`` (``none`` or e.g. ``bfloat16``) overrides the detection: the
    test suite pins it so that its results do not depend on the machine it runs on."""
    override = os.environ.get(FAST_DTYPES_ENV)
    if override is None:
        return fast_dtypes_from_flags(cpu_flags())
    names = {n.strip() for n in override.split(",") if n.strip()} - {"none"}
    table = {"bfloat16": torch.bfloat16, "float16": torch.float16}
    if names - set(table):
        raise InputError(
            f"{FAST_DTYPES_ENV}={override!r}: allowed are none or a comma list of "
            f"{', '.join(table)}"
        )
    return frozenset(table[n] for n in names)


def resolve_dtype(
    name: str | torch.dtype | None, device: str, source: torch.dtype | None = None
) -> torch.dtype | str:
    """The dtype block forwards run in. ``auto`` is the checkpoint's dtype (``source``; "auto"
    for transformers where unknown) on a GPU, and on a CPU whose 16-bit matmuls are fast
    (``fast_cpu_dtypes``); elsewhere a 16-bit checkpoint runs in fp32, and the log says why.
    Statistics and solvers are fp32 whatever this is (``compress.stats``, ``compress.obs``)."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        if device != "cpu":
            return source or "auto"
        if source is None or source == torch.float32 or not source.is_floating_point:
            return torch.float32
        if source in fast_cpu_dtypes():
            return source
        flags = " or ".join(_FAST_CPU_FLAGS.get(source, ("a fast 16-bit unit",)))
        logger.info(
            "dtype auto: the %s checkpoint runs in float32: this CPU has no fast %s matmul "
            "(no %s)", str(source).removeprefix("torch."), str(source).removeprefix("torch."),
            flags,
        )  # fmt: skip
        return torch.float32
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
        dt = resolve_dtype(
            dtype, device, source_dtype if isinstance(source_dtype, torch.dtype) else None
        )
        if isinstance(qc, dict) and qc.get("quant_method") == "gptq":
            model = _load_gptq_dense(path, config, dt)
        else:
            model = _from_pretrained(path, dt)
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

    from polyprune.gptq_format import load_gptq_state

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


def skeleton(config) -> nn.Module:
    """The model's modules on the meta device: shapes without weights, in milliseconds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)

"""LAPE, language activation probability entropy (Tang et al., ACL 2024, "Language-Specific
Neurons: The Key to Multilingual Capabilities in Large Language Models").

A neuron of a gated MLP, down_proj(act(gate_proj(x)) * up_proj(x)) with any activation act
(SwiGLU: SiLU; Gemma's GeGLU: tanh-approximated GELU), is *active* on a token when
act(gate) > 0, evaluated with the model's own ``act_fn`` on its own gate outputs (for SiLU and
GELU that is gate > 0 up to underflow of denormal inputs, where act(gate) rounds to 0).
Per language l, its activation probability p_l is the fraction of tokens on which it is
active. The probabilities are L1-normalised over languages, p'_l = p_l / sum p,
and LAPE = -sum_l p'_l ln p'_l (natural log, 0 ln 0 = 0): low LAPE means language-specific. A
neuron that never fires has no distribution over languages: its LAPE is NaN.

:class:`LapeCounter` hooks the MLPs of a model and accumulates, per language and neuron, the
count of active tokens and the sum of |act(gate) * up| (the neuron's output magnitude) through
the kernel dispatcher (``kernels.lape_count``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from polyprune.kernels.lape_count import lape_count
from polyprune.models import find_blocks

__all__ = [
    "LapeCounter",
    "LanguageNeurons",
    "GATED_PARTS",
    "box_stats",
    "lape_entropy",
    "neuron_groups",
    "select_language_neurons",
    "gated_mlps",
]


def lape_entropy(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """LAPE per neuron from counts (L, N) of active tokens and token totals (L,)."""
    p = counts.double() / tokens.double().reshape(-1, 1)  # activation probability
    total = p.sum(0, keepdim=True)
    q = p / total  # NaN where the neuron never fires
    ent = -(q * torch.log(q)).nan_to_num(0.0).sum(0)  # 0 ln 0 = 0
    return torch.where(total[0] > 0, ent, torch.nan)


GATED_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder block, if it is a gated MLP down_proj(act_fn(gate_proj(x)) *
    up_proj(x)), whatever its activation: the module that has all of ``GATED_PARTS``."""
    mlps = []
    for block in find_blocks(model)[1]:
        mlp = next((m for m in block.modules() if all(hasattr(m, a) for a in GATED_PARTS)), None)
        if mlp is None:
            raise ValueError(f"{type(block).__name__} has no gated MLP ({', '.join(GATED_PARTS)})")
        mlps.append(mlp)
    return mlps


class LapeCounter:
    """Counts per layer, language and neuron while the model runs; use as a context manager
    and set ``lang`` before each forward pass."""

    def __init__(self, model: nn.Module, n_langs: int, device: torch.device | str | None = None):
        self.mlps = gated_mlps(model)
        width = self.mlps[0].gate_proj.out_features
        device = next(model.parameters()).device if device is None else device
        self.counts = torch.zeros(len(self.mlps), n_langs, width, dtype=torch.int64, device=device)
        self.magnitude = torch.zeros(len(self.mlps), n_langs, width, device=device)
        # lape_count adds both statistics; each hook keeps one and drops the other here
        self._unused_counts = torch.zeros(n_langs, width, dtype=torch.int64, device=device)
        self._unused_sums = torch.zeros(n_langs, width, device=device)
        self.tokens = torch.zeros(n_langs, dtype=torch.int64)
        self.lang = 0
        # Tokens of the next batch to count, flattened (batch * seq,) bool; None counts all.
        # analyze leaves special tokens out (BOS is an attention sink with outlier activations,
        # the same in every language: it would only dilute the per-language probabilities).
        self.keep: torch.Tensor | None = None
        self._handles: list = []

    def __enter__(self) -> LapeCounter:
        for i, mlp in enumerate(self.mlps):
            self._handles.append(mlp.gate_proj.register_forward_hook(self._gate_hook(i, mlp)))
            self._handles.append(mlp.down_proj.register_forward_pre_hook(self._down_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _gate_hook(self, i: int, mlp: nn.Module):
        def hook(module, args, out):
            act = self._kept(mlp.act_fn(out).reshape(-1, out.shape[-1]))  # (tokens, neurons)
            # counts of act(gate) > 0 go to this layer's row; its |act| sums are not needed
            lape_count(act, self.counts[i], self._unused_sums, self.lang)
            if i == 0:
                self.tokens[self.lang] += act.shape[0]

        return hook

    def _down_hook(self, i: int):
        def hook(module, args):
            A = self._kept(args[0].reshape(-1, args[0].shape[-1]))  # act(gate) * up
            lape_count(A, self._unused_counts, self.magnitude[i], self.lang)

        return hook

    def _kept(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep is None:
            return x
        if self.keep.shape[0] != x.shape[0]:
            raise ValueError(f"keep has {self.keep.shape[0]} tokens, the batch {x.shape[0]}")
        return x[self.keep.to(x.device)]

    def entropy(self) -> torch.Tensor:
        """LAPE (layers, neurons)."""
        return torch.stack([lape_entropy(c, self.tokens) for c in self.counts.cpu()])

    def probabilities(self) -> torch.Tensor:
        """Activation probability (layers, languages, neurons)."""
        return self.counts.cpu().double() / self.tokens.double().reshape(1, -1, 1)

    def output_magnitude(self) -> torch.Tensor:
        """Mean |act(gate) * up| per token over all languages (layers, neurons)."""
        return self.magnitude.cpu().double().sum(1) / self.tokens.sum().double()


def neuron_groups(dense_lape: torch.Tensor, percent: float = 2.0) -> list[torch.Tensor]:
    """Flat neuron indices (into ``dense_lape.flatten()``) sorted by ascending dense LAPE and
    cut into groups of ``percent`` % of the neurons that fire (NaN LAPE is left out), the
    most language-specific group first. Ties keep index order."""
    if not 0 < percent <= 100:
        raise ValueError(f"group size {percent}% must be in (0, 100]")
    flat = dense_lape.flatten()
    order = torch.argsort(flat.nan_to_num(math.inf), stable=True)
    order = order[: int((~flat.isnan()).sum())]
    n_groups = max(1, round(100 / percent))
    return [g for g in torch.tensor_split(order, n_groups) if len(g)]


def box_stats(values: torch.Tensor) -> dict[str, float]:
    """Quartiles, whiskers at 1.5 IQR (matplotlib's rule) and mean of the finite values."""
    v = values[torch.isfinite(values)].double()
    if len(v) == 0:
        return {k: math.nan for k in ("whislo", "q1", "med", "q3", "whishi", "mean")} | {"n": 0}
    q1, med, q3 = (torch.quantile(v, q).item() for q in (0.25, 0.5, 0.75))
    iqr = q3 - q1
    lo = v[v >= q1 - 1.5 * iqr].min().item()
    hi = v[v <= q3 + 1.5 * iqr].max().item()
    return {"whislo": lo, "q1": q1, "med": med, "q3": q3, "whishi": hi,
            "mean": v.mean().item(), "n": len(v)}  # fmt: skip


@dataclass(frozen=True)
class LanguageNeurons:
    """The language-specific neurons of Tang et al.'s selection."""

    selected: torch.Tensor  # flat (layer * width + neuron) indices, lowest LAPE first
    languages: torch.Tensor  # bool (len(selected), L): the languages each neuron belongs to
    filter_value: float  # the activation probability a neuron must exceed in some language
    activation_bar: float  # ... and in each language it is assigned to

    def per_language(self) -> list[set[int]]:
        return [set(self.selected[self.languages[:, i]].tolist())
                for i in range(self.languages.shape[1])]  # fmt: skip


def select_language_neurons(
    probs: torch.Tensor,
    top_rate: float = 0.01,
    filter_rate: float = 0.95,
    activation_bar_ratio: float = 0.95,
) -> LanguageNeurons:
    """Tang et al. (2024), Sec. 2 and their ``identify.py``, from activation probabilities
    (layers, L, neurons):

    1. filter: a neuron is a candidate only if its probability in some language exceeds the
       ``filter_rate`` quantile (``kthvalue``) of all probabilities;
    2. select the ``top_rate`` fraction of all neurons with the lowest LAPE among candidates;
    3. assign a selected neuron to every language whose probability exceeds the
       ``activation_bar_ratio`` quantile of all probabilities.
    """
    for name, v in (("top_rate", top_rate), ("filter_rate", filter_rate),
                    ("activation_bar_ratio", activation_bar_ratio)):  # fmt: skip
        if not 0 < v < 1:
            raise ValueError(f"{name} {v} must be in (0, 1)")
    layers, L, width = probs.shape
    p = probs.permute(0, 2, 1).reshape(-1, L).double()  # (layers * width, L)
    flat = p.flatten()

    def kth(ratio: float) -> float:
        return flat.kthvalue(max(1, round(len(flat) * ratio))).values.item()

    filter_value = kth(filter_rate)
    total = p.sum(1, keepdim=True)
    q = p / total
    ent = -(q * torch.log(q)).nan_to_num(0.0).sum(1)
    candidate = (p > filter_value).any(1) & (total[:, 0] > 0)
    ent = torch.where(candidate, ent, torch.inf)
    k = min(round(len(ent) * top_rate), int(candidate.sum()))
    order = torch.argsort(ent, stable=True)[:k]
    bar = kth(activation_bar_ratio)
    return LanguageNeurons(order, p[order] > bar, filter_value, bar)

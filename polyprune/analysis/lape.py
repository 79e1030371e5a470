"""LAPE, language activation probability entropy (Tang et al., ACL 2024, "Language-Specific
Neurons: The Key to Multilingual Capabilities in Large Language Models").

A neuron of a SwiGLU MLP (down_proj(act(gate) * up)) is *active* on a token when
act(gate) > 0. Per language l, its activation probability p_l is the fraction of tokens on
which it is active. The probabilities are L1-normalised over languages, p'_l = p_l / sum p,
and LAPE = -sum_l p'_l ln p'_l (natural log, 0 ln 0 = 0): low LAPE means language-specific. A
neuron that never fires has no distribution over languages: its LAPE is NaN.

:class:`LapeCounter` hooks the MLPs of a model and accumulates, per language and neuron, the
count of active tokens and the sum of |act(gate) * up| (the neuron's output magnitude) through
the kernel dispatcher (``kernels.lape_count``).
"""

from __future__ import annotations

import torch
from torch import nn

from polyprune.kernels.lape_count import lape_count
from polyprune.models import find_blocks

__all__ = ["LapeCounter", "lape_entropy", "swiglu_mlps"]


def lape_entropy(counts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """LAPE per neuron from counts (L, N) of active tokens and token totals (L,)."""
    p = counts.double() / tokens.double().reshape(-1, 1)  # activation probability
    total = p.sum(0, keepdim=True)
    q = p / total  # NaN where the neuron never fires
    ent = -(q * torch.log(q)).nan_to_num(0.0).sum(0)  # 0 ln 0 = 0
    return torch.where(total[0] > 0, ent, torch.nan)


def swiglu_mlps(model: nn.Module) -> list[nn.Module]:
    """The MLP of every decoder block, if it is SwiGLU-shaped (gate_proj, up_proj, act_fn)."""
    mlps = []
    for block in find_blocks(model)[1]:
        mlp = next(
            (m for m in block.modules() if hasattr(m, "gate_proj") and hasattr(m, "act_fn")), None
        )
        if mlp is None:
            raise ValueError(f"{type(block).__name__} has no SwiGLU MLP (gate_proj, act_fn)")
        mlps.append(mlp)
    return mlps


class LapeCounter:
    """Counts per layer, language and neuron while the model runs; use as a context manager
    and set ``lang`` before each forward pass."""

    def __init__(self, model: nn.Module, n_langs: int):
        self.mlps = swiglu_mlps(model)
        width = self.mlps[0].gate_proj.out_features
        device = next(model.parameters()).device
        self.counts = torch.zeros(len(self.mlps), n_langs, width, dtype=torch.int64, device=device)
        self.magnitude = torch.zeros(len(self.mlps), n_langs, width, device=device)
        # lape_count adds both statistics; each hook keeps one and drops the other here
        self._unused_counts = torch.zeros(n_langs, width, dtype=torch.int64, device=device)
        self._unused_sums = torch.zeros(n_langs, width, device=device)
        self.tokens = torch.zeros(n_langs, dtype=torch.int64)
        self.lang = 0
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
            act = mlp.act_fn(out).reshape(-1, out.shape[-1])  # (tokens, neurons)
            # counts of act(gate) > 0 go to this layer's row; its |act| sums are not needed
            lape_count(act, self.counts[i], self._unused_sums, self.lang)
            if i == 0:
                self.tokens[self.lang] += act.shape[0]

        return hook

    def _down_hook(self, i: int):
        def hook(module, args):
            A = args[0].reshape(-1, args[0].shape[-1])  # act(gate) * up: the neuron outputs
            lape_count(A, self._unused_counts, self.magnitude[i], self.lang)

        return hook

    def entropy(self) -> torch.Tensor:
        """LAPE (layers, neurons)."""
        return torch.stack([lape_entropy(c, self.tokens) for c in self.counts.cpu()])

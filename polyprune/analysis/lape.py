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
the kernel dispatcher (``kernels.lape_count``). :data:`LAPE` is the ``lape`` metric of
``polyprune analyze`` (one counter per model during the lockstep pass: :class:`LapeCounters`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from polyprune.analysis.markdown import table
from polyprune.analysis.metric import (
    Accumulator,
    Metric,
    PassContext,
    ReportContext,
    too_few_languages,
)
from polyprune.kernels.lape_count import lape_count
from polyprune.models import find_blocks

__all__ = [
    "LAPE",
    "LapeCounters",
    "lape_metrics",
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


class LapeCounters(Accumulator):
    """One :class:`LapeCounter` per model, hooked for the pass; ``on_batch`` tells each the
    language of the rows about to run and which of their tokens count (special ones do not)."""

    def __init__(self, models: dict, n_langs: int, keep: torch.Tensor, device: str):
        self.keep = keep
        self.counters = {n: LapeCounter(m, n_langs, device=device) for n, m in models.items()}

    def open(self) -> None:
        for c in self.counters.values():
            c.__enter__()

    def close(self) -> None:
        for c in self.counters.values():
            c.__exit__(None, None, None)

    def on_batch(self, name: str, seg: int, rows: slice) -> None:
        self.counters[name].lang = seg
        self.counters[name].keep = self.keep[rows].bool().reshape(-1)

    def state(self) -> dict:
        return self.counters


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def lape_metrics(counters: dict[str, LapeCounter], langs: tuple[str, ...], cfg) -> dict:
    """LAPE of the dense and each compressed model: box statistics per neuron group (groups
    of ``lape_group_percent`` % of neurons, sorted by dense LAPE), mean change and output
    magnitude per group, and Tang et al.'s language-specific neurons per language."""
    dense = counters["dense"]
    lape_d = dense.entropy()  # (layers, width)
    groups = neuron_groups(lape_d, cfg.lape_group_percent)
    width = lape_d.shape[1]
    sel_kw = dict(top_rate=cfg.lape_top_rate, filter_rate=cfg.lape_filter_rate,
                  activation_bar_ratio=cfg.lape_bar_ratio)  # fmt: skip
    sel_d = select_language_neurons(dense.probabilities(), **sel_kw)
    sets_d = sel_d.per_language()
    out: dict = {
        "group_percent": cfg.lape_group_percent,
        "groups": [{"neurons": len(g), "dense_lape_range": [lape_d.flatten()[g].min().item(),
                    lape_d.flatten()[g].max().item()]} for g in groups],  # fmt: skip
        "never_firing": {"dense": int(lape_d.isnan().sum())},
        "neurons": lape_d.numel(),
        "selection": {"top_rate": cfg.lape_top_rate, "filter_rate": cfg.lape_filter_rate,
                      "activation_bar_ratio": cfg.lape_bar_ratio,
                      "dense": {lang: len(s) for lang, s in zip(langs, sets_d, strict=True)}},
        "models": {},
    }  # fmt: skip
    for name, counter in counters.items():
        lape = lape_d if name == "dense" else counter.entropy()
        flat, mag = lape.flatten(), counter.output_magnitude().flatten()
        rec = {
            "boxes": [box_stats(flat[g]) for g in groups],
            "magnitude": [mag[g].mean().item() for g in groups],
            "mean_lape": _finite(flat[~flat.isnan()].mean().item()),
        }
        if name != "dense":
            delta = flat - lape_d.flatten()
            rec["change"] = [_finite(delta[g][~delta[g].isnan()].mean().item()) for g in groups]
            out["never_firing"][name] = int(lape.isnan().sum())
            sel = select_language_neurons(counter.probabilities(), **sel_kw)
            rec["selection"] = {}
            for lang, s_d, s_c in zip(langs, sets_d, sel.per_language(), strict=True):
                idx = torch.tensor(sorted(s_d), dtype=torch.long)
                union = len(s_d | s_c)
                rec["selection"][lang] = {
                    "count": len(s_c),
                    "iou_with_dense": len(s_d & s_c) / union if union else 1.0,
                    "lape_change": _finite(delta[idx].nanmean().item()) if len(idx) else None,
                    "magnitude_ratio": _finite(
                        (mag[idx].sum() / counters["dense"].output_magnitude().flatten()[idx]
                         .sum()).item()) if len(idx) else None,
                }  # fmt: skip
        out["models"][name] = rec
    out["layer_of_group"] = [torch.bincount(g // width, minlength=lape_d.shape[0]).tolist()
                             for g in groups]  # fmt: skip
    return out


def lape_boxes(lape: dict, colors: dict, path: Path) -> Path:
    """LAPE per neuron group (sorted by dense LAPE), dense vs each compressed model."""
    import matplotlib.pyplot as plt
    import numpy as np

    from polyprune.analysis.plots import save

    runs = [k for k in lape["models"] if k != "dense"]
    n = len(lape["groups"])
    fig, axes = plt.subplots(len(runs), 1, figsize=(max(8, 0.32 * n + 2), 2.8 * len(runs)),
                             squeeze=False)  # fmt: skip
    x = np.arange(n)
    for ax, run in zip(axes[:, 0], runs, strict=True):
        for model, offset in (("dense", -0.2), (run, 0.2)):
            stats = [dict(b, label=str(i)) for i, b in enumerate(lape["models"][model]["boxes"])]
            keep = [i for i, b in enumerate(stats) if b["n"]]
            ax.bxp([stats[i] for i in keep], positions=x[keep] + offset, widths=0.35,
                   showfliers=False, patch_artist=True,
                   boxprops={"facecolor": colors[model], "alpha": 0.55},
                   medianprops={"color": "k"})  # fmt: skip
        ax.set_xticks(x[:: max(1, n // 25)], [str(i + 1) for i in x[:: max(1, n // 25)]])
        ax.set_xlim(-1, n)
        ax.set_ylabel("LAPE")
        ax.set_title(f"dense (black) vs {run}", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[-1, 0].set_xlabel(
        f"neuron group ({lape['group_percent']:g}% of neurons each, by ascending dense LAPE)"
    )
    fig.suptitle("LAPE per neuron group")
    return save(fig, path)


def lape_groups(lape: dict, colors: dict, path: Path) -> Path:
    """Per neuron group: mean LAPE change after compression, and mean output magnitude."""
    import matplotlib.pyplot as plt
    import numpy as np

    from polyprune.analysis.plots import nan_array, save

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    n = len(lape["groups"])
    x = np.arange(1, n + 1)
    for label, rec in lape["models"].items():
        if label != "dense":
            axes[0].plot(x, nan_array(rec["change"]), marker="o", ms=2, label=label,
                         color=colors[label])  # fmt: skip
        axes[1].plot(x, rec["magnitude"], marker="o", ms=2, label=label, color=colors[label],
                     lw=2 if label == "dense" else 1)  # fmt: skip
    axes[0].axhline(0, color="k", lw=0.8)
    axes[0].set_ylabel("mean LAPE change (compressed - dense)")
    axes[1].set_ylabel("mean |act(gate) * up| per token")
    for ax in axes:
        ax.set_xlabel("neuron group (most language-specific first)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("LAPE change and neuron output magnitude per neuron group")
    return save(fig, path)


def language_neurons(lape: dict, langs: list[str], colors: dict, path: Path) -> Path:
    """Language-specific neurons per language (Tang et al.'s selection): dense and each run."""
    import matplotlib.pyplot as plt
    import numpy as np

    from polyprune.analysis.plots import save

    models = list(lape["models"])
    counts = {"dense": [lape["selection"]["dense"][lang] for lang in langs]}
    for m in models[1:]:
        counts[m] = [lape["models"][m]["selection"][lang]["count"] for lang in langs]
    width = 0.8 / len(models)
    # Bars get narrower past 14 inches: 7 languages x 8 models made a 34-inch strip of
    # unreadable 8-point text, shrunk to nothing in any viewer.
    fig, ax = plt.subplots(figsize=(min(14, max(6, 0.22 * len(langs) * len(models) + 2)), 4.5))
    x = np.arange(len(langs))
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, counts[m], width, label=m,
               color=colors[m])  # fmt: skip
    ax.set_xticks(x, langs)
    ax.set_ylabel("language-specific neurons")
    sel = lape["selection"]
    title = (f"Language-specific neurons (lowest {sel['top_rate']:.0%} LAPE, activation bar "
             f"at the {sel['activation_bar_ratio']:.0%} quantile)")  # fmt: skip
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, ncol=min(len(models), 8), loc="upper center",
              bbox_to_anchor=(0.5, -0.08))  # fmt: skip
    ax.grid(alpha=0.3, axis="y")
    return save(fig, path)


class _Lape(Metric):
    name = "lape"
    needs_pass = True

    def unavailable(self, ctx: PassContext) -> str | None:
        try:
            gated_mlps(ctx.meta)
        except ValueError:
            return f"the model has no gated MLP ({', '.join(GATED_PARTS)})"
        return too_few_languages(ctx)

    def accumulator(self, models: dict, ctx: PassContext) -> LapeCounters:
        return LapeCounters(models, len(ctx.cfg.langs), ctx.keep, ctx.cfg.device)

    def finish(self, state: dict, ctx: PassContext) -> dict:
        return lape_metrics(state, ctx.cfg.langs, ctx.cfg)

    def report(self, section: dict, ctx: ReportContext) -> list[str]:
        lp, langs, out = section, ctx.langs, ctx.out
        box = lape_boxes(lp, ctx.colors, out / "lape-boxes.png")
        grp = lape_groups(lp, ctx.colors, out / "lape-groups.png")
        sel = language_neurons(lp, langs, ctx.colors, out / "lape-neurons.png")
        md = ["## LAPE: language-specific neurons", "",
              f"Activation probability entropy of every FFN neuron (Tang et al., 2024) over "
              f"{', '.join(langs)}; neurons sorted by dense LAPE into groups of "
              f"{lp['group_percent']:g}%. Language-specific neurons per language (Tang et "
              "al.'s selection) and their overlap (IoU) with the dense model's:", ""]  # fmt: skip
        rows = [["dense", *[lp["selection"]["dense"][x] for x in langs]]]
        for k, r in lp["models"].items():
            if k != "dense":
                rows.append([k, *[f"{r['selection'][x]['count']} "
                                  f"({r['selection'][x]['iou_with_dense']:.2f})"
                                  for x in langs]])  # fmt: skip
        md += table(["model", *langs], rows)
        return md + [f"![LAPE per neuron group]({box.name})", "", f"![LAPE change]({grp.name})",
                     "", f"![language-specific neurons]({sel.name})", ""]  # fmt: skip


LAPE = _Lape()

"""LSAR, language-specific and language-agnostic subspaces (Xie et al., EMNLP 2022,
"Discovering Low-rank Subspaces for Language-agnostic Multilingual Representations").

Per layer, with M (d x L) holding one mean prompt embedding per language (token mean, special
tokens excluded, then the mean over prompts):

1. mu = the mean column; the SVD of the centred M - mu 1^T gives the rank-r fit
   M' = mu 1^T + M_s Gamma^T (M_s: the first r left singular vectors, Gamma: the scaled right
   ones);
2. orthogonality step: mu' = (M'^+)^T 1 / ||(M'^+)^T 1||^2, and the SVD of M' - mu' 1^T gives
   the final M_s (its first r left singular vectors), as the public LSAR code does;
3. the language-specific part of an embedding e is M_s M_s^T e, the language-agnostic part
   (I - M_s M_s^T) e.

When Gamma has full rank, mu' is the part of mu orthogonal to M_s, so step 2 returns the span
of step 1's M_s; it is kept because it is what the reference does (and it also yields mu', the
language-agnostic mean). Default r = L - 1. :func:`projected_change` measures, for dense and
compressed embeddings of the same prompts, how far compression moves each part.
:data:`LSAR` is the ``lsar`` metric of ``polyprune analyze`` (prompt means from the lockstep
pass: :class:`PromptMeans`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from polyprune.analysis.markdown import fmt, table
from polyprune.analysis.metric import (
    Accumulator,
    Metric,
    PassContext,
    ReportContext,
    too_few_languages,
)

__all__ = ["LSAR", "PromptMeans", "lsar_metrics", "lsar_subspace", "projected_change",
           "projected_norms"]  # fmt: skip


def lsar_subspace(M: torch.Tensor, rank: int | None = None) -> torch.Tensor:
    """M_s (d, r), orthonormal columns, from M (d, L) of per-language mean embeddings."""
    d, L = M.shape
    r = L - 1 if rank is None else rank
    if not 1 <= r <= min(d, L):
        raise ValueError(f"rank {r} must be in [1, {min(d, L)}] for {L} languages")
    M = M.double()
    mu = M.mean(1, keepdim=True)  # (d, 1)
    U, S, Vh = torch.linalg.svd(M - mu, full_matrices=False)
    Ms, Gamma = U[:, :r], (S[:r, None] * Vh[:r]).t()  # (d, r), (L, r)
    M_fit = mu + Ms @ Gamma.t()  # (d, L)
    ones = torch.ones(L, 1, dtype=M.dtype)
    v = torch.linalg.pinv(M_fit).t() @ ones  # (d, 1)
    mu_prime = v / (v.norm() ** 2)
    U2, _, _ = torch.linalg.svd(M_fit - mu_prime @ ones.t(), full_matrices=False)
    return U2[:, :r].float()


def projected_change(
    Ms: torch.Tensor, dense: torch.Tensor, compressed: torch.Tensor
) -> tuple[float, float]:
    """Mean over prompts of ||P_s (e - e')|| and ||(I - P_s)(e - e')||, P_s = M_s M_s^T, for
    embeddings (prompts, d): the change of the language-specific and -agnostic parts."""
    delta = (dense.float() - compressed.float()).t()  # (d, prompts)
    specific = Ms @ (Ms.t() @ delta)
    agnostic = delta - specific
    return specific.norm(dim=0).mean().item(), agnostic.norm(dim=0).mean().item()


def projected_norms(Ms: torch.Tensor, emb: torch.Tensor) -> tuple[float, float]:
    """Mean over prompts of ||P_s e|| and ||(I - P_s) e|| for embeddings (prompts, d): the
    size of each part, against which a change is read."""
    return projected_change(Ms, emb, torch.zeros_like(emb))


class PromptMeans(Accumulator):
    """Per model, per layer: the mean block output of every prompt over its ordinary tokens
    (``keep`` (N, T), special tokens 0), (N, d) float32 on the CPU."""

    def __init__(self, models: dict, keep: torch.Tensor):
        self.keep = keep
        self.n_tokens = keep.sum(1, keepdim=True).cpu()  # (N, 1)
        self.means: dict[str, list[torch.Tensor]] = {n: [] for n in models}

    def on_layer(self, outs: dict) -> None:
        for name, h in outs.items():  # (N, T, d) -> prompt means (N, d)
            k = self.keep.to(h.device, h.dtype).unsqueeze(-1)
            self.means[name].append((h * k).sum(1).float().cpu() / self.n_tokens)

    def state(self) -> dict:
        return self.means


def lsar_metrics(
    emb: dict[str, list[torch.Tensor]], segments: list[slice], langs: tuple[str, ...],
    rank: int | None,
) -> dict:  # fmt: skip
    """Per layer: the LSAR subspace of the dense model, and for each run how far its prompt
    embeddings moved in the language-specific and language-agnostic parts."""
    dense = emb["dense"]
    r = len(langs) - 1 if rank is None else rank
    out: dict = {"rank": r, "dense_norm": {"specific": [], "agnostic": []}, "runs": {}}
    subspaces = []
    for layer_emb in dense:
        M = torch.stack([layer_emb[seg].mean(0) for seg in segments], 1)  # (d, L)
        Ms = lsar_subspace(M, r)
        subspaces.append(Ms)
        s, a = projected_norms(Ms, layer_emb)
        out["dense_norm"]["specific"].append(s)
        out["dense_norm"]["agnostic"].append(a)
    for run, layers in emb.items():
        if run == "dense":
            continue
        rec: dict = {"specific": [], "agnostic": [], "relative_specific": [],
                     "relative_agnostic": [], "per_language": {lang: {"specific": [],
                     "agnostic": []} for lang in langs}}  # fmt: skip
        for layer, (Ms, e2) in enumerate(zip(subspaces, layers, strict=True)):
            s, a = projected_change(Ms, dense[layer], e2)
            rec["specific"].append(s)
            rec["agnostic"].append(a)
            rec["relative_specific"].append(s / out["dense_norm"]["specific"][layer])
            rec["relative_agnostic"].append(a / out["dense_norm"]["agnostic"][layer])
            for lang, seg in zip(langs, segments, strict=True):
                ls, la = projected_change(Ms, dense[layer][seg], e2[seg])
                rec["per_language"][lang]["specific"].append(ls)
                rec["per_language"][lang]["agnostic"].append(la)
        out["runs"][run] = rec
    return out


def lsar_lines(lsar: dict, colors: dict, path: Path) -> Path:
    """Change of the language-agnostic and language-specific parts per layer, one panel each."""
    import matplotlib.pyplot as plt

    from polyprune.analysis.plots import save

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, part in zip(axes, ("agnostic", "specific"), strict=True):
        for label, rec in lsar["runs"].items():
            ys = rec[part]
            ax.plot(range(len(ys)), ys, marker="o", ms=3, label=label, color=colors[label])
        ax.set_title(f"language-{part} part")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean ||change|| of prompt embedding")
        ax.grid(alpha=0.3)
    axes[0].legend(title="calibration", fontsize=8)
    fig.suptitle(f"LSAR (rank {lsar['rank']}): how far compression moves each part")
    return save(fig, path)


class _Lsar(Metric):
    name = "lsar"
    needs_pass = True
    unavailable = staticmethod(too_few_languages)

    def accumulator(self, models: dict, ctx: PassContext) -> PromptMeans:
        return PromptMeans(models, ctx.keep)

    def finish(self, state: dict, ctx: PassContext) -> dict:
        return lsar_metrics(state, ctx.segments, ctx.cfg.langs, ctx.cfg.lsar_rank)

    def report(self, section: dict, ctx: ReportContext) -> list[str]:
        ls = section
        png = lsar_lines(ls, ctx.colors, ctx.out / "lsar.png")
        md = ["## LSAR: language-specific and language-agnostic subspaces", "",
              f"Per layer, the dense model's per-language mean prompt embeddings give a "
              f"rank-{ls['rank']} language-specific subspace (Xie et al., 2022). Mean change "
              "of each part, relative to the size of that part in the dense model, averaged "
              "over layers:", ""]  # fmt: skip
        rows = [[k, fmt(sum(r["relative_specific"]) / len(r["relative_specific"]), 4),
                 fmt(sum(r["relative_agnostic"]) / len(r["relative_agnostic"]), 4)]
                for k, r in ls["runs"].items()]  # fmt: skip
        md += table(["calibration", "specific (relative)", "agnostic (relative)"], rows)
        return md + [f"![LSAR per layer]({png.name})", ""]


LSAR = _Lsar()

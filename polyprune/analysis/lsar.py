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
"""

from __future__ import annotations

import torch

__all__ = ["lsar_subspace", "projected_change", "projected_norms"]


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

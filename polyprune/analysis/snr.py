"""Signal-to-noise ratio and pruning error of hidden states, per layer (Kuzmin et al., 2023,
"Pruning vs Quantization: Which is Better?", as adapted in the paper this toolkit grew from).

With dense hidden states h and compressed ones h' of layer l (the output of decoder block l)
over all tokens t of the held-out text:

* SNR_l = 10 log10( sum_t ||h_t||^2 / sum_t ||h_t - h'_t||^2 ) in dB. Identical states give
  an infinite ratio; it is capped at ``SNR_CAP_DB`` so that layer means stay finite.
* PE_l = (1 / (T d)) sum_t ||h_t - h'_t||^2 / c_l^2, with c_l = (1/T) sum_t ||h_t|| the mean
  token-vector norm of the dense layer: the mean squared error per coordinate in units of the
  layer's typical scale, so layers whose residual streams differ in size are comparable.
* Model SNR = the mean of SNR_l over layers.

Only sums are kept (:class:`LayerErrorStats`), so any number of tokens streams through in
constant memory; the squared sums go through the kernel dispatcher (``kernels.errors``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from polyprune.kernels.errors import error_sums

__all__ = ["SNR_CAP_DB", "LayerErrorStats", "model_snr", "pruning_error", "snr_db"]

SNR_CAP_DB = 100.0


def snr_db(signal: float, error: float, cap: float = SNR_CAP_DB) -> float:
    """10 log10(signal / error), capped at ``cap`` (also when error is 0)."""
    if error <= 0:
        return cap
    if signal <= 0:
        return -cap
    return min(cap, 10.0 * math.log10(signal / error))


def pruning_error(error: float, norm_sum: float, tokens: int, dim: int) -> float:
    """(1 / (T d)) sum ||h - h'||^2 / c^2 with c = norm_sum / T."""
    c = norm_sum / tokens
    return error / (tokens * dim) / (c * c) if c > 0 else math.inf


@dataclass
class LayerErrorStats:
    """Running sums for one layer: sum ||h||^2, sum ||h - h'||^2, sum ||h||, tokens, dim."""

    signal: float = 0.0
    error: float = 0.0
    norm_sum: float = 0.0
    tokens: int = 0
    dim: int = 0

    def update(self, h: torch.Tensor, h2: torch.Tensor) -> None:
        h, h2 = h.reshape(-1, h.shape[-1]), h2.reshape(-1, h2.shape[-1])
        sig, err = error_sums(h, h2)
        self.signal += sig
        self.error += err
        self.norm_sum += h.float().norm(dim=-1).sum(dtype=torch.float64).item()
        self.tokens += h.shape[0]
        self.dim = h.shape[1]

    @property
    def snr_db(self) -> float:
        return snr_db(self.signal, self.error)

    @property
    def pruning_error(self) -> float:
        return pruning_error(self.error, self.norm_sum, self.tokens, self.dim)


def model_snr(layers: list[LayerErrorStats]) -> float:
    """The mean per-layer SNR in dB."""
    return sum(layer.snr_db for layer in layers) / len(layers)

"""Language-wise diagnostics of compressed models: SNR and pruning error of hidden states
(``snr``), pruning-mask IoU across calibration languages (``iou``), LSAR language-specific and
-agnostic subspaces (``lsar``), LAPE language-specific neurons (``lape``); ``analyze`` computes
them in one lockstep pass (``hidden``), ``report`` and ``plots`` write the report folder."""

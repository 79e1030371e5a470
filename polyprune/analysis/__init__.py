"""Language-wise diagnostics of compressed models: SNR and pruning error of hidden states,
pruning-mask IoU across calibration languages (LSAR and LAPE to follow)."""

"""Text corpora (wiki-mini, WikiText-2, C4) and the GPTQ calibration/evaluation window protocols."""

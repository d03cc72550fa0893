"""Evaluation: perplexity with the GPTQ protocol."""

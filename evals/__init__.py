"""Evaluation: the lm-eval adapter, local tasks, perplexity and MTP acceptance."""

"""Adapters for other tools (TRL, accelerate, lm-eval) over the same core."""

"""Evaluation: the compiled evaluator, count-based baselines, sample quality and plots."""

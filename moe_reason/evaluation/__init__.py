"""Evaluation of exported models: loss, puzzles, lm-eval, and generation."""

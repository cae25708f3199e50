"""Reasoning tasks: Sudoku and maze generators with validators, puzzle files, the formulations that turn them
into training data, and the scoring of a model's answers."""

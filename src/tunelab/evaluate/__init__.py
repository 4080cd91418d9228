"""Evaluation: text metrics, probe checkers and base-vs-tuned comparison.

`metrics` scores an answer against a reference, `checkers` grades probe items and loads
probe files, `compare` turns per-item scores into deltas with confidence intervals and
flips. None of them loads a model; generation is wired in by the caller.
"""

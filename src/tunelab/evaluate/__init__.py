"""Evaluation: text metrics, probe checkers and base-vs-tuned comparison.

`metrics` scores an answer against a reference, `checkers` grades probe items (reading what
an answer asserts, `answers`) and loads probe files, `compare` turns per-item scores into
deltas with paired tests, Holm-corrected decisions, confidence intervals and flips. None of
them loads a model; generation is wired in by the caller. docs/EVALUATION.md explains all.
"""

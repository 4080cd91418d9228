"""Triton kernels of the fast path, each with the exact torch ops it replaces as its fallback.

`cross_entropy` (the loss a chunk of logits at a time), `rms_norm` (frozen-weight RMSNorm
under liger), `lora_dropout` (fused LoRA's dropout and low-rank products). Off CUDA, or
without Triton, every function here runs torch ops; the tests run the kernels themselves
on the CPU through Triton's interpreter.
"""

"""The reference recipe, rebuilt from MISSION.md's table with plain transformers + PEFT + Trainer.

LoRA: r 8, alpha 32, dropout 0.1 on q,k,v,o,gate,up,down; batch 10, accumulation 4,
lr 1e-4, gradient checkpointing (switchable, to measure both), DataCollatorForSeq2Seq
padding. P-Tuning: PromptEncoder, 10 virtual tokens, MLP, hidden 1024, dropout 0.1;
batch 2, accumulation 2, lr 1e-4. The model is bf16 without mixed-precision flags, as the
recipe loads it. Checkpoints (every 100 steps in the recipe) are off: they are not
training throughput. A fixed number of optimizer steps is timed after a warmup; real
tokens are the non-pad tokens of exactly the micro-batches those steps consumed.
"""

from __future__ import annotations

import tempfile

import torch

from common import Clock, build_model, fresh_memory, parameter_count, peak_gib

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {"lora": dict(batch=10, accumulation=4), "ptuning": dict(batch=2, accumulation=2)}


class CountingCollator:
    """DataCollatorForSeq2Seq, recording each micro-batch's real tokens in call order."""

    def __init__(self, tokenizer):
        from transformers import DataCollatorForSeq2Seq

        self.inner = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)
        self.real, self.padded = [], []

    def __call__(self, features):
        batch = self.inner(features)
        self.real.append(int(batch["attention_mask"].sum()))
        self.padded.append(batch["attention_mask"].numel())
        return batch


def peft_model(model, method: str, gradient_checkpointing: bool):
    from peft import LoraConfig, PromptEncoderConfig, TaskType, get_peft_model

    if gradient_checkpointing:
        model.enable_input_require_grads()
    if method == "lora":
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=LORA_TARGETS, inference_mode=False,
                            r=8, lora_alpha=32, lora_dropout=0.1)
    else:
        config = PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=10,
                                     encoder_reparameterization_type="MLP", encoder_dropout=0.1,
                                     encoder_hidden_size=1024)
    return get_peft_model(model, config)


def run(shape: str, method: str, features: list[dict], tokenizer, device: torch.device, dtype: torch.dtype,
        steps: int, warmup: int, gradient_checkpointing: bool = True, settings: dict | None = None) -> dict:
    """Train the reference recipe for warmup + steps optimizer steps; measure the last `steps`.
    `settings` (batch, accumulation) replaces the recipe's only in the CPU harness check."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    settings = settings or SETTINGS[method]
    clock = Clock(device)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                clock.begin()
            elif state.global_step == warmup + steps:
                clock.end()

    with fresh_memory(device), tempfile.TemporaryDirectory() as out:
        model = build_model(shape, device, dtype, vocab_size=len(tokenizer))
        n_params = parameter_count(model)
        model = peft_model(model, method, gradient_checkpointing)
        collator = CountingCollator(tokenizer)
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=settings["batch"],
            gradient_accumulation_steps=settings["accumulation"], learning_rate=1e-4,
            max_steps=warmup + steps, logging_steps=10, save_strategy="no", report_to="none",
            gradient_checkpointing=gradient_checkpointing, use_cpu=device.type == "cpu",
            disable_tqdm=True, seed=42)
        trainer = Trainer(model=model, args=args, train_dataset=features, data_collator=collator,
                          callbacks=[Timer()])
        trainer.train()
        peak = peak_gib(device)
        del trainer, model
    per_step = settings["accumulation"]
    measured = slice(warmup * per_step, (warmup + steps) * per_step)
    real = sum(collator.real[measured])
    return {"tokens": real, "seconds": clock.seconds, "tokens_per_s": real / clock.seconds,
            "padding": 1 - real / sum(collator.padded[measured]), "peak_gib": peak,
            "params": n_params, "rows_per_step": settings["batch"] * per_step}

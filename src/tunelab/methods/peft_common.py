"""Save and load shared by every method built on PEFT."""

from __future__ import annotations

from pathlib import Path

import torch


def save_peft(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def load_peft(base: torch.nn.Module, directory: Path, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)

"""Save and load shared by every method built on PEFT.

Weight-delta adapters (LoRA, IA3) use PEFT's files as they are. Virtual-token adapters
(P-Tuning, prompt tuning, prefix tuning) go through `virtual_tokens.py`, imported only
when used because importing PEFT takes seconds.
"""

from __future__ import annotations

from pathlib import Path

# torch is imported inside the functions that use it (annotations are strings), so that
# `tunelab VERB --help` never waits for it.


def save_peft(model: torch.nn.Module, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def load_peft(base: torch.nn.Module, directory: Path, trainable: bool = False) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)


# `virtual_tokens` imports torch and peft at its top: read inside these functions, so that
# `tunelab --help` (which reads the method configs) never waits for them.
def apply_virtual(model: torch.nn.Module, peft_config) -> torch.nn.Module:
    from . import virtual_tokens

    return virtual_tokens.apply(model, peft_config)


def save_virtual(model: torch.nn.Module, directory: Path) -> None:
    from . import virtual_tokens

    virtual_tokens.save(model, directory)


def load_virtual(base: torch.nn.Module, directory: Path, trainable: bool = False) -> torch.nn.Module:
    from . import virtual_tokens

    return virtual_tokens.load(base, directory, trainable)

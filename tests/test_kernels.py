"""`--train.kernels`: when liger-kernel is used, and that it leaves transformers as it found it.

liger's kernels are Triton (CUDA only); their speed and per-token parity are measured on the
GPU (bench/throughput.py, bench/learning_parity.py). Here: the choice, the errors, and that
the modeling module's globals come back after the run while the instance keeps its patches.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from conftest import build_model, build_tokenizer
from tunelab.accel import liger as kernels
from tunelab.config import ConfigError, TrainConfig

CUDA = torch.device("cuda")  # a device object only: nothing runs on it here


def model():
    return build_model("qwen2", len(build_tokenizer()))


def test_torch_and_cpu_never_use_liger():
    net = model()
    assert not kernels.wanted("torch", net, CUDA)
    assert not kernels.wanted("auto", net, torch.device("cpu"))
    with pytest.raises(ConfigError, match="--train.kernels liger.*CUDA"):
        kernels.wanted("liger", net, torch.device("cpu"))


def test_liger_asked_for_but_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import fails
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", None)
    net = model()
    assert not kernels.wanted("auto", net, CUDA)
    with pytest.raises(ConfigError, match=r"tunelab\[liger\]"):
        kernels.wanted("liger", net, CUDA)


def test_config_accepts_only_known_kernels():
    assert TrainConfig().kernels == "auto"
    with pytest.raises(ConfigError, match="--train.kernels"):
        TrainConfig(kernels="triton")


def test_module_globals_come_back():
    module = types.ModuleType("fake_modeling")
    module.rope, module.Norm = "rope", "Norm"
    with kernels.module_globals_restored(module):
        module.rope, module.added = "liger_rope", "new"
        del module.Norm
    assert (module.rope, module.Norm) == ("rope", "Norm") and not hasattr(module, "added")


def test_liger_patches_the_instance_and_restores_the_module(monkeypatch):
    net = model()
    modeling = sys.modules[type(net).__module__]
    original_rope = modeling.apply_rotary_pos_emb
    calls = []

    def fake_apply(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, model=None):
        calls.append(dict(rope=rope, rms_norm=rms_norm, swiglu=swiglu, flce=fused_linear_cross_entropy))
        modeling.apply_rotary_pos_emb = "liger rope"
        model.model.norm.patched = True

    monkeypatch.setattr(kernels, "liger_function", lambda m: fake_apply)
    with kernels.liger(net, "auto", CUDA) as used:
        assert used and modeling.apply_rotary_pos_emb == "liger rope"
    assert calls == [dict(rope=True, rms_norm=True, swiglu=True, flce=False)]  # tunelab keeps its own loss
    assert modeling.apply_rotary_pos_emb is original_rope
    assert net.model.norm.patched
    with kernels.liger(net, "torch", CUDA) as used:
        assert not used
    assert len(calls) == 1

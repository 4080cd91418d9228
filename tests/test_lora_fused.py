"""The fused LoRA forward/backward computes what PEFT's LoRA layers compute.

Same loss and same gradients for every trainable tensor, with dropout (the masks are drawn
in the same order from the same generator), with a bias on the base projection (Qwen2's
q/k/v), in fp32 and under bf16 autocast; and outside plain training (no grad, adapters
disabled) the layer is PEFT's again.
"""

from __future__ import annotations

import pytest
import torch

from conftest import build_model, build_tokenizer
from tunelab.methods import get
from tunelab.methods import lora_fused
from tunelab.methods.lora import LoraConfig


def lora_net(dropout: float, arch: str = "qwen2"):
    base = build_model(arch, len(build_tokenizer()), seed=0)
    net = get("lora").apply(base, LoraConfig(dropout=dropout))
    with torch.no_grad():  # B starts at zero: give the adapter an effect so A gets gradients
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return net.train()


def loss_and_grads(net, ids, seed: int):
    torch.manual_seed(seed)
    net.zero_grad(set_to_none=True)
    logits = net(input_ids=ids, use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_matches_peft(arch, dropout):
    net = lora_net(dropout, arch)
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(2))
    want_loss, want = loss_and_grads(net, ids, seed=5)
    fused = lora_fused.fuse(net)
    assert fused == 7 * net.config.num_hidden_layers  # q k v o gate up down in every layer
    got_loss, got = loss_and_grads(net, ids, seed=5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    different_seed, _ = loss_and_grads(net, ids, seed=6)
    assert dropout == 0 or not torch.equal(different_seed, got_loss)  # dropout really is drawn


def test_fused_under_bf16_autocast_is_close_and_keeps_fp32_adapters():
    net = lora_net(0.0)
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(2))
    net.to(torch.bfloat16)
    for name, p in net.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # as PEFT keeps adapters on a half-precision base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_loss, want = loss_and_grads(net, ids, seed=0)
        lora_fused.fuse(net)
        got_loss, got = loss_and_grads(net, ids, seed=0)
    assert abs(got_loss.item() - want_loss.item()) < 2e-2
    for name in want:
        assert got[name].dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(got[name].flatten(), want[name].flatten(), dim=0)
        assert cos > 0.99, name


def test_outside_plain_training_peft_forward_runs():
    net = lora_net(0.3)
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    net.eval()
    with torch.no_grad():
        want = net(input_ids=ids).logits
        with net.disable_adapter():
            base = net(input_ids=ids).logits
    lora_fused.fuse(net)
    with torch.no_grad():
        torch.testing.assert_close(net(input_ids=ids).logits, want)
        with net.disable_adapter():
            torch.testing.assert_close(net(input_ids=ids).logits, base)
    lora_fused.unfuse(net)
    assert not any(hasattr(m, "_peft_forward") for m in net.modules())

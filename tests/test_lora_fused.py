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
from tunelab.accel import lora as lora_fused
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


def test_projections_that_read_one_input_form_one_group():
    net = lora_net(0.1)
    lora_fused.fuse(net)
    groups = lora_fused.groups_of(net)
    names = [[next(n for n, m in net.named_modules() if m is layer).rsplit(".", 1)[-1] for layer in g.layers]
             for g in groups]
    assert names == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]] \
        * net.config.num_hidden_layers
    # gate/up (outputs 4x wider than the input here) fold B into the base matmul
    assert [g.extended is not None for g in groups] == [False, False, True, False] * net.config.num_hidden_layers
    assert len(groups[2].b_blocks) == 1  # one strided view of both members' B columns


def test_folding_members_of_unequal_width_matches_peft(monkeypatch):
    """`FOLD_RATIO` 1 folds q/k/v (outputs of unequal width: a B block a member) and o too."""
    monkeypatch.setattr(lora_fused, "FOLD_RATIO", 1)
    net = lora_net(0.3)
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(2))
    want_loss, want = loss_and_grads(net, ids, seed=5)
    lora_fused.fuse(net)
    groups = lora_fused.groups_of(net)
    assert [g.extended is not None for g in groups] == [True, True, True, False] * net.config.num_hidden_layers
    assert len(set(groups[0].out_features)) > 1 and len(groups[0].b_blocks) == 3
    got_loss, got = loss_and_grads(net, ids, seed=5)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    for name in want:  # atol: fp32 rounding of another summation order
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_folding_keeps_the_weights_and_unfuse_gives_them_back():
    net = lora_net(0.0)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    lora_fused.fuse(net)
    mlp = net.base_model.model.model.layers[0].mlp
    group = mlp.gate_proj._tunelab_group
    assert group.extended is not None and not mlp.gate_proj.base_layer.weight.is_contiguous()
    assert mlp.up_proj.base_layer.weight.data_ptr() == group.extended[1].data_ptr()  # a view, no copy
    lora_fused.unfuse(net)
    for name, p in net.named_parameters():
        assert p.is_contiguous() and torch.equal(p, before[name]), name


def test_group_dropout_masks_are_independent_and_scaled():
    rows = torch.randn(200, 50, generator=torch.Generator().manual_seed(0))
    a = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    low, (dropped, mask) = lora_fused.dropout_low(rows, a, 0.25)
    assert low.shape == (3, 200, 4) and mask.shape == (3, 200, 50) and mask.dtype == torch.bool
    torch.testing.assert_close(dropped, rows * mask / 0.75)
    torch.testing.assert_close(low, torch.bmm(dropped, a.transpose(1, 2)))
    assert abs(mask.float().mean().item() - 0.75) < 0.02
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[1], mask[2])


@pytest.mark.parametrize("fused_adamw", [False, True])
def test_adapter_copies_follow_the_optimizer(fused_adamw):
    """Training steps through the fused path move the weights as PEFT's path does, with any
    optimizer: a fused AdamW step (on CPU as on CUDA) updates the weights in place without
    bumping their version counters, which once left the eager path training against the
    initial copies (B = 0). The copies are rebuilt from the live weights at every forward."""
    ids = torch.randint(3, 200, (1, 24), generator=torch.Generator().manual_seed(2))
    trained, losses = [], []
    for fused in (False, True):
        net = lora_net(0.0)
        if fused:
            lora_fused.fuse(net)
        params = [p for p in net.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused_adamw)
        for _ in range(3):
            loss, _ = loss_and_grads(net, ids, seed=0)
            optimizer.step()
        losses.append(loss)
        trained.append([p.detach().clone() for p in params])
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(*trained):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    store = lora_fused.groups_of(net)[0].store
    refreshes = []
    real = store.refresh
    store.refresh = lambda: (refreshes.append(1), real())
    with torch.no_grad():
        net(input_ids=ids)
        net(input_ids=ids)
    assert refreshes == [1, 1]  # once a forward, whatever changed the weights


def test_a_member_called_on_another_input_gets_its_own_answer():
    net = lora_net(0.0).eval()
    attention = net.base_model.model.model.layers[0].self_attn
    x1, x2 = torch.randn(2, 1, 5, net.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = attention.q_proj(x1), attention.k_proj(x2), attention.v_proj(x1)
        lora_fused.fuse(net)
        got = attention.q_proj(x1), attention.k_proj(x2), attention.v_proj(x1)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

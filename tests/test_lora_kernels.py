"""The Triton kernels of fused LoRA's dropout against the torch ops they replace, on the CPU
through Triton's interpreter (a subprocess: the interpreter is chosen when kernels are
defined). On CUDA the same kernels run compiled (bench/kernels_bench.py times them)."""

from __future__ import annotations

import textwrap

import torch

from conftest import run_interpreted
from tunelab.methods import lora_kernels

CHECK = textwrap.dedent("""
    import torch
    from tunelab.methods import lora_kernels as k

    k.usable = lambda x: True  # CPU tensors through the interpreted kernels
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for copies, rows, width in ((3, 37, 300), (1, 5, 64), (2, 64, 2048)):
            x = torch.randn(rows, width).to(dtype)
            kept, mask = k.dropout_copies(x, 0.25, copies)
            assert kept.shape == mask.shape == (copies, rows, width) and mask.dtype == torch.bool
            torch.testing.assert_close(kept, (x.float() * mask / 0.75).to(dtype))  # every element written
            if rows * width >= 4096:
                assert abs(mask.float().mean().item() - 0.75) < 0.03, mask.float().mean()
            if copies > 1:
                assert not torch.equal(mask[0], mask[1])  # each copy its own mask
            _, odd = k.dropout_copies(x, 0.1, copies)  # 0.1 is drawn as 6554 / 65536
            if rows * width >= 4096:
                assert abs(odd.float().mean().item() - 0.9) < 0.03
            again, mask_again = k.dropout_copies(x, 0.25, copies)
            assert not torch.equal(mask, mask_again)  # a fresh seed every call

            low = torch.randn(copies, rows, 8).to(dtype)
            a = torch.randn(copies, 8, width).to(dtype)
            for m in (mask, None):
                want = torch.bmm(low.float(), a.float())
                if m is not None:
                    want = want * m / 0.75
                want = want.sum(0)
                got = k.masked_low_rank_sum(low, a, m, 0.25)
                assert got.dtype == dtype and got.shape == (rows, width)
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
                base = torch.randn(rows, width + 16).to(dtype)[:, :width]  # a strided [T, in] view
                got = k.masked_low_rank_sum(low, a, m, 0.25, add=base)
                torch.testing.assert_close(got.float(), want + base.float(), rtol=tol, atol=tol)
    print("lora kernels ok")
""")


def test_triton_kernels_match_torch_ops_in_the_interpreter():
    run_interpreted(CHECK, "lora kernels ok")


def test_cpu_takes_the_torch_ops():
    x = torch.randn(4, 6)
    assert not lora_kernels.usable(x)
    kept, mask = lora_kernels.dropout_copies(x, 0.5, 2)
    torch.testing.assert_close(kept, x * mask / 0.5)
    low, a = torch.randn(2, 4, 3), torch.randn(2, 3, 6)
    torch.testing.assert_close(lora_kernels.masked_low_rank_sum(low, a, mask, 0.5),
                               (torch.bmm(low, a) * mask / 0.5).sum(0))


END_TO_END = textwrap.dedent("""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tunelab.methods import get, lora_fused, lora_kernels as k
    from tunelab.methods.lora import LoraConfig

    k.usable = lambda x: True  # the fused path's dropout through the interpreted kernels
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        net = get("lora").apply(Qwen2ForCausalLM(config), LoraConfig(dropout=0.25))  # exact in 16 bits
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        nets.append(net.train())
    peft_net, fused_net = nets
    drawn = []  # the masks the fused path's kernel draws, one [T, in] per projection, in call order
    real = k.dropout_copies
    def recording(rows, p, copies):
        kept, mask = real(rows, p, copies)
        drawn.extend(mask.unbind(0))
        return kept, mask
    lora_fused.dropout_copies = recording
    lora_fused.fuse(fused_net)

    class Scripted(torch.nn.Module):  # PEFT's dropout, replaying those masks in the same order
        p = 0.25
        def forward(self, x):
            return x * drawn.pop(0).view_as(x) / (1 - self.p)
    for module in peft_net.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = Scripted()

    ids = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(2))
    def loss_and_grads(net):
        logits = net(input_ids=ids, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    got_loss, got = loss_and_grads(fused_net)
    assert len(drawn) == 7 * config.num_hidden_layers
    want_loss, want = loss_and_grads(peft_net)
    assert not drawn  # PEFT used every mask
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
    print("fused path with kernels ok")
""")


def test_fused_lora_with_the_kernels_matches_peft_on_the_same_masks():
    """The whole fused path (groups, folded B, both kernels) against PEFT's forward given the
    masks the kernel drew: same loss and the same gradient for every adapter weight."""
    run_interpreted(END_TO_END, "fused path with kernels ok")

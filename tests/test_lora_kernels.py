"""The Triton kernels of fused LoRA's dropout against the torch ops they replace, on the CPU
through Triton's interpreter (a subprocess: the interpreter is chosen when kernels are
defined). On CUDA the same kernels run compiled (bench/kernels_bench.py times them)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from conftest import run_interpreted
from tunelab.accel.kernels import lora_dropout as lora_kernels

COPIES_CHECK = textwrap.dedent("""
    import torch
    from tunelab.accel.kernels import lora_dropout as k

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


FUSED_CHECK = textwrap.dedent("""
    import torch
    from tunelab.accel.kernels import lora_dropout as k

    k.usable = lambda x: True  # CPU tensors through the interpreted kernels
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        for copies, rows, width, rank in ((3, 37, 300, 8), (1, 5, 64, 4), (2, 70, 1100, 8), (1, 33, 260, 20)):
            x = torch.randn(rows, width).to(dtype)
            a = (torch.randn(copies, rank, width) / width ** 0.5).to(dtype)
            low, (bits,) = k.dropout_low(x, a, 0.25, bits=True)
            assert bits.dtype == torch.uint8 and low.shape == (copies, rows, rank) and low.dtype == dtype
            masks = k.unpack(bits, width)
            assert masks.shape == (copies, rows, width)
            kept = x.float() * masks / 0.75
            torch.testing.assert_close(low.float(), torch.bmm(kept, a.float().transpose(1, 2)), rtol=tol, atol=tol)
            if rows * width >= 4096:
                assert abs(masks.float().mean().item() - 0.75) < 0.03, masks.float().mean()
                assert abs(k.unpack(k.dropout_low(x, a, 0.1, bits=True)[1][0], width).float().mean().item() - 0.9) < 0.03
            if copies > 1:
                assert not torch.equal(masks[0], masks[1])  # each copy its own mask
            assert not torch.equal(bits, k.dropout_low(x, a, 0.25, bits=True)[1][0])  # a fresh seed every call

            grad_low = torch.randn(copies, rows, rank).to(dtype)
            want_x = (torch.bmm(grad_low.float(), a.float()) * masks / 0.75).sum(0)
            want_a = torch.bmm(grad_low.float().transpose(1, 2), kept)
            base = torch.randn(rows, width + 16).to(dtype)[:, :width]  # a strided [T, in] view
            per_copy = torch.linspace(0.5, 2.0, copies)[:, None, None]
            for scale, add in ((0.5, None), (per_copy, base)):
                got_x, got_a = k.dropout_low_backward(grad_low, a, (bits,), x, 0.25, scale, add=add)
                assert got_x.dtype == dtype and got_a.dtype == torch.float32
                torch.testing.assert_close(got_a, want_a * scale, rtol=tol, atol=tol)
                want = want_x if add is None else want_x + add.float()
                torch.testing.assert_close(got_x.float(), want, rtol=tol, atol=tol)
            got_x, got_a = k.dropout_low_backward(grad_low, a, (bits,), x, 0.25, 0.5, add=base, need_x=False)
            assert got_x is None
            torch.testing.assert_close(got_a, want_a * 0.5, rtol=tol, atol=tol)
    print("fused lora kernels ok")
""")


def test_triton_kernels_match_torch_ops_in_the_interpreter():
    run_interpreted(COPIES_CHECK, "lora kernels ok")


def test_fused_triton_kernels_match_torch_ops_in_the_interpreter():
    run_interpreted(FUSED_CHECK, "fused lora kernels ok")


def reference_grads(x, a, masks, keep_scale, grad_low):
    """Autograd's gradients of low = (masks * x * keep_scale) @ a^T."""
    x, a = x.clone().requires_grad_(), a.clone().requires_grad_()
    low = torch.bmm(x * masks * keep_scale, a.transpose(1, 2))
    low.backward(grad_low)
    return low.detach(), x.grad, a.grad


def test_cpu_takes_the_torch_ops_and_they_match_autograd():
    x = torch.randn(40, 24)
    a = torch.randn(3, 4, 24)
    assert not lora_kernels.usable(x)
    grad_low = torch.randn(3, 40, 4)
    for p in (0.5, 0.0):
        low, drawn = lora_kernels.dropout_low(x, a, p)
        if p:
            dropped, masks = drawn
            assert masks.dtype == torch.bool and masks.shape == (3, 40, 24) and not torch.equal(masks[0], masks[1])
            torch.testing.assert_close(dropped, x * masks / (1 - p))
        else:
            assert drawn == ()
            masks = torch.ones(3, 40, 24)
        want_low, want_x, want_a = reference_grads(x, a, masks, 1 / (1 - p), grad_low)
        torch.testing.assert_close(low, want_low)
        add = torch.randn(40, 24)
        got_x, got_a = lora_kernels.dropout_low_backward(grad_low, a, drawn, x, p, 2.0, add=add)
        torch.testing.assert_close(got_x, want_x + add, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_a, 2.0 * want_a, rtol=1e-5, atol=1e-5)
        assert lora_kernels.dropout_low_backward(grad_low, a, drawn, x, p, 2.0, need_x=False)[0] is None


def test_unpack_reads_bit_j_of_a_byte_as_column_j_sub_blocks_on():
    sub, width = lora_kernels.SUB, lora_kernels.CHUNK + 5  # two chunks, the second mostly past the end
    bits = torch.zeros(1, 1, 2 * sub, dtype=torch.uint8)
    bits[0, 0, 3] = 0b00000101  # chunk 0, lane 3: bits 0 and 2
    bits[0, 0, sub + 4] = 0b1  # chunk 1, lane 4
    masks = lora_kernels.unpack(bits, width)
    assert masks.shape == (1, 1, width)
    assert masks[0, 0].nonzero().flatten().tolist() == [3, 2 * sub + 3, lora_kernels.CHUNK + 4]


END_TO_END = textwrap.dedent("""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tunelab.methods import get
    from tunelab.accel import lora as lora_fused
    from tunelab.accel.kernels import lora_dropout as k
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
    real = k.dropout_low
    def recording(rows, a, p, **choices):
        low, saved = real(rows, a, p, **choices)
        masks = k.unpack(saved[0], rows.shape[1]) if choices["bits"] else saved[1]
        drawn.extend(masks.unbind(0))
        return low, saved
    lora_fused.dropout_low = recording
    lora_fused.fuse(fused_net, dropout_bits=FUSED_FLAG)

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


@pytest.mark.parametrize("fused", [False, True], ids=["copies", "fused-kernels"])
def test_fused_lora_with_the_kernels_matches_peft_on_the_same_masks(fused):
    """The whole fused path (groups, folded B, the dropout kernels: the default pair or the
    mask-bits one) against PEFT's forward given the masks the kernels drew: same loss and the
    same gradient for every adapter weight."""
    run_interpreted(END_TO_END.replace("FUSED_FLAG", str(fused)), "fused path with kernels ok")


SAVED = textwrap.dedent("""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tunelab.methods import get
    from tunelab.accel import lora as lora_fused
    from tunelab.accel.kernels import lora_dropout as k
    from tunelab.methods.lora import LoraConfig

    k.usable = lambda x: True
    config = Qwen2Config(vocab_size=120, hidden_size=64, intermediate_size=384, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    ids = torch.randint(3, 120, (1, 24), generator=torch.Generator().manual_seed(0))
    tokens, rank = ids.numel(), 8
    totals = {}
    for fused in (False, True):
        torch.manual_seed(0)
        net = get("lora").apply(Qwen2ForCausalLM(config), LoraConfig(r=rank, dropout=0.1)).train()
        lora_fused.fuse(net, dropout_bits=fused)
        flat = lora_fused.groups_of(net)[0].store.flat
        loss = net(input_ids=ids, use_cache=False).logits.float().mean()
        nodes, seen, stack = [], set(), [loss.grad_fn]
        while stack:  # every _LoraGroup node of the graph, before backward frees what it saved
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if type(node).__name__ == "_LoraGroupBackward":
                nodes.append(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
        assert len(nodes) == 4  # q/k/v, o, gate/up, down
        total = 0
        for node in nodes:
            group = node.group
            size, width = group.size, group.in_features
            saved = [t for t in node.saved_tensors if t is not None
                     and t.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr()]  # not the adapter copies
            got = sum(t.numel() * t.element_size() for t in saved)
            low = size * tokens * rank * 4
            if fused:  # the input, the mask bits
                want = tokens * width * 4 + size * tokens * -(-width // k.CHUNK) * k.SUB + low
            else:  # the kept copies, the byte masks
                want = size * tokens * width * (4 + 1) + low
            assert got == want, (fused, group.names, got, want)
            total += got
        totals[fused] = total
    assert totals[True] < totals[False], totals  # (at the 1.5B shape in bf16: about half, docs/PERFORMANCE.md)
    print("saved", totals)
""")


def test_the_fused_pair_keeps_mask_bits_not_copies():
    """What each fused LoRA group keeps for the backward, byte for byte: the kept copies and
    byte masks with the default pair, the input and the mask bits with the mask-bits pair."""
    run_interpreted(SAVED, "saved")

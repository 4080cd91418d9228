"""The fast path (tunelab.accel) computes what the padded path computes, token by token.

Packed rows must not see each other (a leak shows on single tokens of later rows, not in
an average), the chunked loss must give the loss and gradients of plain cross-entropy, and
a packed step must leave the same gradients as a padded one.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model, build_tokenizer
from tunelab import accel
from tunelab.accel import graphs
from tunelab.accel.attention import use_varlen_attention
from tunelab.accel.loss import LossPlan, plan_loss, token_loss_sum
from tunelab.config import ConfigError, TrainConfig
from tunelab.data import ChatFormat, Rendered
from tunelab.data.packing import pack_rows, packed_inputs, padded_inputs
from tunelab.methods import get
from tunelab.methods.lora import LoraConfig

CPU = torch.device("cpu")
TEXTS = [("你是谁？", "我是甄嬛，家父是大理寺少卿甄远道。"), ("Who are you?", "I am a helpful assistant."),
         ("What is the capital of France?", "Paris is the capital of France."),
         ("1.11 和 1.9 哪个大？", "1.9 更大。"), ("Hello", "The quick brown fox jumps over the lazy dog.")]


@pytest.fixture(scope="module")
def rows() -> list[Rendered]:
    fmt = ChatFormat(build_tokenizer())
    return [fmt.render([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in TEXTS]


def lora(arch: str = "qwen2", dropout: float = 0.0, seed: int = 0):
    base = build_model(arch, len(build_tokenizer()), seed=seed)
    with torch.no_grad():  # LoRA B starts at zero; give the adapter a non-trivial effect
        net = get("lora").apply(base, LoraConfig(dropout=dropout))
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    return net.train()


def per_token(net, batch, plan) -> torch.Tensor:
    with torch.no_grad():
        return token_loss_sum(net, batch, plan, CPU, nullcontext(), reduction="none")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_packed_matches_padded_token_by_token(rows, arch):
    net = lora(arch).eval()
    padded_plan = plan_loss(net, CPU, nullcontext())
    padded = per_token(net, padded_inputs(rows, pad_id=0), padded_plan)
    fast = accel.setup(net, "on", True, CPU, nullcontext(), pad_id=0)
    assert fast.packed and fast.varlen and fast.loss.trunk is not None
    packed = per_token(net, packed_inputs(rows), fast.loss)
    assert packed.shape == padded.shape == (sum(r.num_supervised for r in rows),)
    torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_the_check_catches_attention_across_rows(rows):
    """Causal attention over the whole packed sequence (what plain SDPA does with restarting
    position_ids and no mask) leaves the first row exact and corrupts tokens of later ones."""
    net = lora().eval()
    plan = plan_loss(net, CPU, nullcontext())
    padded = per_token(net, padded_inputs(rows, pad_id=0), plan)
    leaky = packed_inputs(rows)
    for key in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"):
        leaky.pop(key)
    use_varlen_attention(net)
    diff = (per_token(net, leaky, plan) - padded).abs()
    first = rows[0].num_supervised
    assert diff[:first].max() < 1e-5
    assert diff[first:].max() > 1e-3


def test_padding_is_dropped_not_attended(rows):
    net = lora().eval()
    plan = plan_loss(net, CPU, nullcontext())
    reference = per_token(net, padded_inputs(rows, pad_id=0), plan)  # SDPA with its padding mask
    use_varlen_attention(net, padded=True)
    torch.testing.assert_close(per_token(net, padded_inputs(rows, pad_id=0), plan), reference,
                               rtol=0, atol=1e-5)


def test_pack_rows_keeps_every_row_within_budget():
    rows = [Rendered([0] * n, [0] * n) for n in (5, 9, 3, 12, 7, 1, 8)]
    bins = pack_rows(rows, max_tokens=12)
    assert sorted(len(r.input_ids) for b in bins for r in b) == [1, 3, 5, 7, 8, 9, 12]
    assert all(sum(len(r.input_ids) for r in b) <= 12 for b in bins)
    assert len(bins) == 4  # 45 tokens need at least 4 bins of 12
    assert [len(b) for b in pack_rows([Rendered([0] * 20, [0] * 20)], 12)] == [1]  # too long: alone


def test_packed_step_leaves_the_same_gradients_as_a_padded_step(rows):
    """One optimizer step's gradients, packed in two micro-batches vs padded two rows at a time."""
    from tunelab.step import optimizer_step

    cfg = TrainConfig(batch_size=6, micro_batch_size=2, micro_batch_tokens=60)
    grads = []
    for packing in ("off", "on"):
        net = lora()
        fast = accel.setup(net, packing, True, CPU, nullcontext(), pad_id=0)
        assert fast.packed == (packing == "on")
        params = [p for p in net.parameters() if p.requires_grad]
        assert len(fast.micro_batches(rows, cfg.micro_batch_size, cfg.micro_batch_tokens)) > 1
        loss, tokens, _ = optimizer_step(net, rows, cfg, fast, CPU, nullcontext(), params)
        grads.append((loss, [p.grad.clone() for p in params]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def ptuning(seed: int = 0):
    from tunelab.methods.ptuning import PTuningConfig

    base = build_model("qwen2", len(build_tokenizer()), seed=seed)
    torch.manual_seed(seed)
    return get("ptuning").apply(base, PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16))


def test_prompt_learning_padded_rows_keep_peft_forward(rows):
    """A method that prepends virtual tokens, on padded rows: the loss skips them and equals
    the loss computed from PEFT's full logits by hand."""
    net = ptuning().eval()
    plan = plan_loss(net, CPU, nullcontext())
    assert plan.prefix == 4 and plan.prompt is not None
    batch = padded_inputs(rows, pad_id=0)
    mine = per_token(net, batch, plan)
    with torch.no_grad():
        logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 4:]
    labels = batch["labels"]
    plain = F.cross_entropy(logits[labels != -100], labels[labels != -100], reduction="none")
    torch.testing.assert_close(mine, plain)


def test_packing_on_for_a_method_that_cannot_pack_names_the_flag():
    with pytest.raises(ConfigError, match="--train.packing"):
        accel.setup(lora(), "on", False, CPU, nullcontext(), pad_id=0)


def test_auto_packs_only_where_flash_attention_runs():
    fast = accel.setup(lora(), "auto", True, CPU, nullcontext(), pad_id=0)
    assert not fast.packed and not fast.varlen
    assert isinstance(fast.loss, LossPlan) and fast.loss.trunk is not None


def graphed_lora(rows):
    """A LoRA net on the fast path, its `GraphedSteps` and the bucketed inputs of `rows`."""
    from tunelab.accel.graphs import GraphedSteps

    net = lora().eval()
    fast = accel.setup(net, "on", True, CPU, nullcontext(), pad_id=0)
    params = [p for p in net.parameters() if p.requires_grad]
    steps = GraphedSteps(net, fast.loss, params, pad_id=0, autocast=nullcontext())
    batch = packed_inputs(rows)
    key, host = steps.host_inputs(batch)
    return net, fast, params, steps, batch, key, host


def test_graph_inputs_compute_the_packed_loss_and_gradients(rows):
    """What a CUDA graph replays (bucketed, padded inputs), run eagerly: the same loss and
    gradients as the unpadded packed micro-batch. Capture itself needs a GPU (bench/)."""
    net, fast, params, steps, batch, key, host = graphed_lora(rows)
    tokens = sum(len(r.input_ids) for r in rows)
    assert key[0] % graphs.TOKEN_BUCKET == 0 and key[0] > tokens and host["cu_seqlens"].numel() % 16 == 0
    assert host["cu_seqlens"][len(rows) + 1] == key[0]  # the padding is a row of its own
    loss, grads = steps._body(dict(host, scale=torch.tensor(0.5)), key[2])
    eager = token_loss_sum(net, batch, fast.loss, CPU, nullcontext()) * 0.5
    eager_grads = torch.autograd.grad(eager, params)
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_graph_body_rebuilds_the_adapter_copies(rows):
    """A replay runs no Python, so no host-side code can refresh the fused adapters' compute
    copies between replays: the captured body must rebuild them itself, from the weights
    as a fused optimizer leaves them (in place, version counters unchanged)."""
    net, fast, params, steps, batch, key, host = graphed_lora(rows)
    before, _ = steps._body(dict(host, scale=torch.tensor(1.0)), key[2])
    versions = [p._version for p in params]
    for p in params:
        p.data.add_(0.05)  # as a fused AdamW step between two replays
    assert [p._version for p in params] == versions
    after, _ = steps._body(dict(host, scale=torch.tensor(1.0)), key[2])
    want = per_token(net, batch, fast.loss).sum()
    after_again, _ = steps._body(dict(host, scale=torch.tensor(1.0)), key[2])
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after_again, after, rtol=1e-6, atol=1e-6)
    assert abs(after.item() - before.item()) > 1e-3


@pytest.mark.parametrize("method", ["ptuning", "prompt_tuning"])
def test_packed_virtual_tokens_match_peft_padded_rows(rows, method):
    """P-Tuning / prompt tuning on packed rows (each row starting with its own virtual
    tokens): per-token loss and the step's gradients equal PEFT's padded forward."""
    from tunelab.step import optimizer_step

    cfg = TrainConfig(batch_size=6, micro_batch_size=2, micro_batch_tokens=64)
    results = []
    for packing in ("off", "on"):
        torch.manual_seed(0)
        net = (ptuning() if method == "ptuning"
               else get(method).apply(build_model("qwen2", len(build_tokenizer())), get(method).config_cls()))
        fast = accel.setup(net, packing, True, CPU, nullcontext(), pad_id=0)
        assert fast.packed == (packing == "on") and fast.loss.prefix > 0
        tokens = per_token(net.eval(), packed_inputs(rows, fast.loss.prefix) if fast.packed
                           else padded_inputs(rows, pad_id=0), fast.loss)
        net.train()
        params = [p for p in net.parameters() if p.requires_grad]
        loss, _, _ = optimizer_step(net, rows, cfg, fast, CPU, nullcontext(), params)
        results.append((tokens, loss, [p.grad.clone() for p in params]))
    (tok_a, loss_a, grads_a), (tok_b, loss_b, grads_b) = results
    torch.testing.assert_close(tok_b, tok_a, rtol=0, atol=1e-5)
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_graph_inputs_carry_virtual_tokens(rows):
    """The bucketed graph inputs of packed P-Tuning rows, run eagerly: the packed loss and
    gradients, the padding row included."""
    from tunelab.accel.graphs import GraphedSteps

    net = ptuning()
    fast = accel.setup(net, "on", True, CPU, nullcontext(), pad_id=0)
    params = [p for p in net.parameters() if p.requires_grad]
    steps = GraphedSteps(net, fast.loss, params, pad_id=0, autocast=nullcontext())
    batch = packed_inputs(rows, fast.loss.prefix)
    key, host = steps.host_inputs(batch)
    loss, grads = steps._body(dict(host, scale=torch.tensor(1.0)), key[2])
    eager = token_loss_sum(net, batch, fast.loss, CPU, nullcontext())
    eager_grads = torch.autograd.grad(eager, params)
    torch.testing.assert_close(loss, eager.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_layers_keeps_the_loss_and_gradients(rows):
    """`--train.compile`: every decoder layer compiled (the eager backend here: the same
    graph capture by dynamo, no C compiler in CI); the packed loss and gradients unchanged."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        net = lora()
        fast = accel.setup(net, "on", True, CPU, nullcontext(), pad_id=0)
        if compiled:
            assert accel.compile_layers(fast.loss.trunk, backend="eager") == net.config.num_hidden_layers
        params = [p for p in net.parameters() if p.requires_grad]
        loss = token_loss_sum(net.eval(), packed_inputs(rows), fast.loss, CPU, nullcontext())
        results.append((loss.detach(), torch.autograd.grad(loss, params)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a)


def test_compile_needs_a_layer_list():
    with pytest.raises(ConfigError, match="--train.compile"):
        accel.compile_layers(torch.nn.Linear(2, 2))


def test_graph_gradients_become_param_grads_without_a_copy_only_for_one_micro_batch(rows, monkeypatch):
    """A step of one micro-batch takes the graph's gradient outputs as `param.grad` (no copy);
    a step of several copies the first and adds the rest, since each replay of the same
    graph overwrites its outputs. The replay itself is faked here (it needs a GPU)."""
    net, fast, params, steps, batch, key, host = graphed_lora(rows)
    static = {name: t.clone() for name, t in host.items()}
    static["scale"] = torch.tensor(1.0)
    outputs = [torch.full_like(p, 1.0) for p in params]

    class Replay:
        def replay(self):
            for g in outputs:
                g.add_(1.0)  # as if the graph computed new gradients into the same buffers

    steps.graphs[key] = (Replay(), static, torch.tensor(0.0), outputs)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: self)
    steps.run(batch, 1.0, alone=True)
    assert all(p.grad is g for p, g in zip(params, outputs))
    for p in params:
        p.grad = None
    steps.run(batch, 1.0)  # the first of two micro-batches: 3.0 each, copied
    assert all(p.grad is not g for p, g in zip(params, outputs))
    steps.run(batch, 1.0)  # the second overwrites the outputs (4.0) and adds them
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in params)


def test_a_sharded_model_trains_without_fused_lora_or_graphs(capsys):
    """Under FSDP2 (fsdp.py) the parameters are DTensors gathered layer by layer: `prepare`
    turns fused LoRA and CUDA graphs off (`unsharded_levers`) and says why, in one line, only
    where either would have run (LoRA layers to fuse; graphs on CUDA). The two-process run
    that needs it: tests/test_distributed.py (fused LoRA there fails on mixed DTensors)."""
    levers = accel.Levers()
    assert levers.fuse_lora and levers.cuda_graphs
    off = accel.unsharded_levers(lora(), levers, CPU)
    assert not off.fuse_lora and not off.cuda_graphs and off.packing == levers.packing
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "fused LoRA off" in line and "CUDA graphs" not in line
    on_cuda = accel.unsharded_levers(lora(), levers, torch.device("cuda"))  # nothing runs on it
    assert not on_cuda.fuse_lora and not on_cuda.cuda_graphs
    assert "fused LoRA and CUDA graphs off" in capsys.readouterr().out
    full = build_model("qwen2", len(build_tokenizer()))  # no LoRA layer: nothing to say on the CPU
    assert not accel.unsharded_levers(full, levers, CPU).fuse_lora
    assert capsys.readouterr().out == ""
    assert accel.sharded(lora()) is False  # a plain model keeps every lever (`prepare` asks this)

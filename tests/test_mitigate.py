"""Mitigation (mitigate.py, data/replay.py): the loss's gradient, exactness at kl 0, replay
mixing, the base recovered with the adapter off, and end-to-end runs on tiny models."""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.config import ConfigError, DataConfig, MitigateConfig, ModelConfig, TrainConfig
from tunelab.data.replay import KLRow, mix, replay_count
from tunelab.data.template import IGNORE, Rendered
from tunelab.methods import MethodConfig
from tunelab.mitigate import ce_kl_sum, without_virtual_tokens
from tunelab.runs import RunDir


def test_ce_kl_sum_is_exactly_cross_entropy_at_weight_zero():
    torch.manual_seed(0)
    logits, targets = torch.randn(7, 11), torch.randint(0, 11, (7,))
    plain = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert torch.equal(ce_kl_sum(logits, torch.randn(7, 11), targets, 0.0), plain)


def test_ce_kl_sum_gradient_matches_finite_differences_and_a_plain_formula():
    torch.manual_seed(1)
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    base, targets = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 6, (5,))
    assert torch.autograd.gradcheck(lambda x: ce_kl_sum(x, base, targets, 0.3), (logits,))
    ce_kl_sum(logits, base, targets, 0.3).backward()
    p, q = logits.detach().softmax(-1), base.softmax(-1)  # d/dlogits: (p - onehot) + w (p - q)
    expected = p - torch.nn.functional.one_hot(targets, 6) + 0.3 * (p - q)
    assert torch.allclose(logits.grad, expected, atol=1e-12)
    # KL vanishes where the tuned model equals the base
    same = torch.randn(4, 6, dtype=torch.float64)
    t = torch.randint(0, 6, (4,))
    assert torch.allclose(ce_kl_sum(same, same, t, 5.0), ce_kl_sum(same, same, t, 0.0))


def row(n: int, tag: int) -> Rendered:
    return Rendered([tag] * n, [IGNORE] + [tag] * (n - 1))


def test_mix_adds_the_share_of_replay_rows_reproducibly():
    train_rows, replay = [row(3, i) for i in range(16)], [row(4, 100 + i) for i in range(10)]
    assert replay_count(16, 0.2) == 4 and replay_count(16, 0) == 0 and replay_count(2, 0.01) == 1
    steps = [mix(train_rows, replay, 0.2, 16, s, 42) for s in range(5)]
    assert all(len(s) == 20 for s in steps)
    drawn = [r.input_ids[0] for s in steps for r in s[16:]]
    assert sorted(drawn[:10]) == list(range(100, 110))  # each pass over the replay set draws every row once
    assert [r.input_ids[0] for r in mix(train_rows, replay, 0.2, 16, 3, 42)[16:]] == drawn[12:16]
    marked = mix(train_rows, replay, 0.2, 16, 0, 42, kl_on="replay")
    assert [isinstance(r, KLRow) for r in marked] == [False] * 16 + [True] * 4
    assert all(isinstance(r, KLRow) for r in mix(train_rows, [], 0.0, 16, 0, 42, kl_on="all"))


def test_mitigate_config_names_the_flag():
    with pytest.raises(ConfigError, match="--mitigate.replay"):
        MitigateConfig(replay=1.0)
    with pytest.raises(ConfigError, match="--mitigate.kl.*--mitigate.replay > 0"):
        MitigateConfig(kl=0.1)  # kl on replay rows needs replay rows
    with pytest.raises(ConfigError, match="--mitigate.select_persona_probes"):
        MitigateConfig(select="persona_keep_general")
    assert not MitigateConfig().active and MitigateConfig(kl=0.1, kl_on="all").active


def test_without_virtual_tokens_drops_the_placeholders_of_each_packed_row():
    from tunelab.data.packing import packed_inputs

    rows = [Rendered([5, 6, 7], [IGNORE, 6, 7]), Rendered([8, 9], [IGNORE, 9])]
    packed = packed_inputs(rows, prefix=2)
    positions = (packed["labels"].flatten() != IGNORE).nonzero().squeeze(1)
    stripped, at = without_virtual_tokens(packed, positions, 2)
    plain = packed_inputs(rows)
    assert torch.equal(stripped["input_ids"], plain["input_ids"])
    assert torch.equal(stripped["position_ids"], plain["position_ids"])
    assert torch.equal(stripped["cu_seq_lens_q"], plain["cu_seq_lens_q"])
    assert stripped["max_length_q"] == plain["max_length_q"]
    assert torch.equal(at, (plain["labels"].flatten() != IGNORE).nonzero().squeeze(1))


# -- end to end on tiny models ---------------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    from conftest import MEMORIZE, write_jsonl

    return write_jsonl(tmp_path / "data.jsonl", MEMORIZE * 2)


def run_train(model_dir, data, out, method="lora", mitigate=MitigateConfig(), **train):
    from tunelab.train import train as fit

    budget = dict(max_steps=3, batch_size=4, micro_batch_size=2, lr=1e-2, save_every=0, check_learning=False)
    return fit(ModelConfig(path=str(model_dir)), DataConfig(path=str(data), system_prompt="You are Bram."),
               MethodConfig(name=method), TrainConfig(**(budget | train)), mitigate, out=str(out))


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in RunDir(run).metrics.read_text().splitlines()]


def test_self_replay_and_kl_train_and_are_cached(tiny_qwen, data_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    plain = losses(run_train(tiny_qwen, data_file, tmp_path / "plain"))
    off = losses(run_train(tiny_qwen, data_file, tmp_path / "off", mitigate=MitigateConfig(kl=0.0)))
    assert off == plain  # the defaults change nothing, bit for bit
    cfg = MitigateConfig(replay=0.34, replay_prompts=6, replay_max_new_tokens=6, kl=0.5)
    run = run_train(tiny_qwen, data_file, tmp_path / "mitigated", mitigate=cfg)
    stats = json.loads(RunDir(run).data_stats.read_text())["replay"]
    assert stats["prompts"] == 6 and 0 < stats["rows"] <= 6
    cached = list((tmp_path / "cache" / "replay").glob("answers-*.jsonl"))
    assert len(cached) == 1 and len(cached[0].read_text().splitlines()) == 6
    mitigated = losses(run)
    assert all(map(lambda x: x == x, mitigated)) and mitigated != plain
    records = [json.loads(line) for line in RunDir(run).metrics.read_text().splitlines()]
    assert all(r["grad_norm"] > 0 for r in records)  # the adapter stays trainable through the KL steps
    assert "mitigate" in RunDir(run).read_config()
    capsys.readouterr()
    again = run_train(tiny_qwen, data_file, tmp_path / "again", mitigate=cfg)  # same key: no generation
    assert "from " + str(cached[0]) in capsys.readouterr().out
    assert losses(again) == mitigated  # generating the answers drew nothing from the run's seeds


@pytest.mark.parametrize("method,packing", [("lora", "on"), ("ptuning", "off"), ("ptuning", "on")])
def test_kl_on_every_path_is_zero_at_the_start_and_matches_the_plain_loss(tiny_qwen, data_file, tmp_path,
                                                                         method, packing):
    """At step 1 the adapter is untouched (LoRA B = 0) or the base differs only by virtual
    tokens; with kl_on all and lr tiny, the first step's loss is the plain one plus the KL
    of tuned vs base, which for LoRA is exactly 0."""
    plain = losses(run_train(tiny_qwen, data_file, tmp_path / "p", method, packing=packing, max_steps=1))
    kl = losses(run_train(tiny_qwen, data_file, tmp_path / "k", method, MitigateConfig(kl=1.0, kl_on="all"),
                          packing=packing, max_steps=1))
    if method == "lora":
        assert kl[0] == pytest.approx(plain[0], rel=1e-5)
    else:  # virtual tokens change the distribution: KL > 0, and finite
        assert kl[0] > plain[0] and kl[0] < plain[0] + 50


def test_kl_is_refused_where_the_base_cannot_be_recovered(tiny_qwen, data_file, tmp_path):
    with pytest.raises(ConfigError, match="--mitigate.kl"):
        run_train(tiny_qwen, data_file, tmp_path / "f", "freeze", MitigateConfig(kl=0.1, kl_on="all"))


@pytest.mark.parametrize("method,packing", [("lora", "off"), ("lora", "on"), ("ptuning", "off"), ("ptuning", "on")])
def test_the_kl_term_equals_a_plain_kl_against_a_separate_base(tiny_qwen, method, packing):
    """loss_sum_with_kl - token_loss_sum == KL(base || tuned) summed over the supervised
    positions, with the base a second, untouched copy of the model (what the adapter-off
    forward must reproduce), on the padded and the packed path."""
    import copy
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM

    from tunelab import accel
    from tunelab.data.collate import pad_batch, shift_labels
    from tunelab.methods import selected
    from tunelab.mitigate import loss_sum_with_kl

    base = AutoModelForCausalLM.from_pretrained(tiny_qwen, dtype=torch.float32)
    reference = copy.deepcopy(base).eval()
    the_method, options = selected(MethodConfig(name=method))
    net = the_method.apply(base, options)
    torch.manual_seed(3)
    with torch.no_grad():  # move the adapter away from its start, so tuned != base
        for p in net.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    net.eval()  # no dropout: both sides compute fixed functions
    cpu = torch.device("cpu")
    fast = accel.setup(net, packing, the_method.capabilities.supports_packing, cpu, nullcontext(), 0)
    rows = [Rendered([5, 6, 7, 8, 9], [IGNORE, IGNORE, 7, 8, 9]), Rendered([10, 11, 12], [IGNORE, 11, 12])]
    batch = fast.micro_batches(rows, 2, 1024)[0]
    with torch.no_grad():
        combined = loss_sum_with_kl(net, dict(batch, kl=1.0), fast.loss, cpu, nullcontext())
        ce = accel.token_loss_sum(net, batch, fast.loss, cpu, nullcontext())
        padded = pad_batch(rows, 0)
        labels = shift_labels(padded["labels"]).flatten()
        keep = labels != IGNORE
        prefix = fast.loss.prefix
        tuned = net(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, prefix:]
        base_logits = reference(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        p_base = base_logits.flatten(0, 1)[keep].log_softmax(-1)
        kl = (p_base.exp() * (p_base - tuned.flatten(0, 1)[keep].log_softmax(-1))).sum()
    assert kl > 1e-3
    assert (combined - ce).item() == pytest.approx(kl.item(), rel=1e-4, abs=1e-5)


def test_choose_keeps_general_first_then_takes_the_most_persona():
    from tunelab.mitigate import choose

    scores = {"base": {"persona": 0.1, "general": 0.8}, "step-0000010": {"persona": 0.5, "general": 0.79},
              "step-0000020": {"persona": 0.7, "general": 0.70}, "final": {"persona": 0.9, "general": 0.5}}
    assert choose(scores, ["step-0000010", "step-0000020", "final"], 0.95)[0] == "step-0000010"
    assert choose(scores, ["step-0000010", "step-0000020", "final"], 0.85)[0] == "step-0000020"
    scores["step-0000010"]["general"] = 0.6  # none keeps 95%: the most general ability
    chosen, why = choose(scores, ["step-0000010", "step-0000020", "final"], 0.95)
    assert chosen == "step-0000020" and "no candidate" in why


def test_select_scores_every_checkpoint_and_installs_the_choice(tiny_qwen, data_file, tmp_path):
    import yaml

    probes = tmp_path / "probes.yaml"
    probes.write_text(yaml.safe_dump({"probes": [
        {"id": "who", "lang": "zh", "category": "persona", "question": "你是谁？",
         "check": {"type": "contains", "any": ["甄嬛"]}, "reference": "我是甄嬛。"}]}, allow_unicode=True))
    cfg = MitigateConfig(select="persona_keep_general", select_persona_probes=str(probes), select_limit=2)
    run = RunDir(run_train(tiny_qwen, data_file, tmp_path / "sel", mitigate=cfg, max_steps=3, save_every=1,
                           keep_checkpoints=3))
    selection = json.loads(run.summary.read_text())["selection"]
    assert set(selection["scores"]) == {"base", "final"} | {c.name for c in run.complete_checkpoints()}
    assert len(selection["scores"]) == 5
    chosen = selection["chosen"]
    source = run.root if chosen == "final" else run.checkpoints / chosen
    assert ((run.adapter / "adapter_model.safetensors").read_bytes()
            == (source / "adapter" / "adapter_model.safetensors").read_bytes())
    assert chosen == "final" or (run.checkpoints / "last-adapter").is_dir()


@pytest.mark.parametrize("name", ["demo", "huanhuan"])
def test_the_example_experiments_have_valid_mitigated_runs(name):
    from pathlib import Path

    from tunelab.experiment import read_spec, resolve_method

    path = Path(__file__).resolve().parent.parent / "examples" / f"{name}.yaml"
    spec = read_spec(path)
    resolved = [resolve_method(entry, spec.get("train") or {}, f"{path}: methods[{i}]", path.parent)
                for i, entry in enumerate(spec["methods"])]
    mitigated = [m for _, _, _, m in resolved if m.active]
    assert mitigated and all(m.replay > 0 and m.kl > 0 for m in mitigated)
    assert len({label for label, *_ in resolved}) == len(resolved)

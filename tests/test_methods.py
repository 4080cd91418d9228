"""Every registered method held to one contract, on tiny models (PEFT's testing_common idea).

For each method (and the LoRA / P-Tuning / prefix variants worth checking): a few steps
lower the loss on a memorizable batch; save -> load gives identical logits, and
load(trainable=True) restores the trainable state exactly; mergeable methods merge to
the same logits, the others refuse and say why; generation (KV cache, left-padded batch,
tunelab's Engine) equals a greedy loop over the full sequence and differs from the base.
Then what is specific to P-Tuning: reference defaults, the adapter off = the base, the
guard against model-specific helpers, and training that continues after a reload.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import MEMORIZE, build_model, build_tokenizer, write_jsonl
from tunelab.config import ConfigError, DataConfig, GenerationConfig, ModelConfig, TrainConfig
from tunelab.data import ChatFormat
from tunelab.data.collate import pad_batch, shift_labels
from tunelab.generate import Engine
from tunelab.methods import METHODS, MethodConfig, NotMergeable, count_parameters, get
from tunelab.models import load_model, load_tokenizer

# (method, options, learning rate, architectures): one row per method or variant.
CASES = [
    ("lora", {}, 1e-2, ("qwen2", "llama")),
    ("lora", {"dora": True}, 1e-2, ("qwen2",)),
    ("lora", {"rslora": True}, 1e-2, ("qwen2",)),
    ("lora", {"init": "pissa"}, 1e-2, ("qwen2",)),
    ("lora", {"init": "olora"}, 2e-2, ("qwen2",)),
    ("qlora", {}, 1e-2, ("qwen2",)),
    ("ia3", {}, 3e-1, ("qwen2", "llama")),
    ("ptuning", {}, 1e-3, ("qwen2", "llama")),
    ("ptuning", {"encoder": "lstm", "encoder_hidden_size": 64}, 1e-2, ("qwen2",)),
    ("prompt_tuning", {}, 5e-2, ("qwen2",)),
    ("prefix", {}, 3e-1, ("qwen2", "llama")),
    ("prefix", {"projection": True, "encoder_hidden_size": 64}, 3e-2, ("qwen2",)),
    ("freeze", {}, 1e-2, ("qwen2", "llama")),
    ("full", {}, 3e-3, ("qwen2", "llama")),
]
PARAMS = [pytest.param((name, options, lr, arch),
                       id="-".join([name, *(f"{k}={v}" for k, v in options.items()), arch]))
          for name, options, lr, archs in CASES for arch in archs]
STEPS = 12
QUESTIONS = [row["instruction"] for row in MEMORIZE]


def conversation(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other jobs for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_registered_method_is_in_the_matrix():
    assert {name for name, *_ in CASES} == set(METHODS)
    assert set(METHODS) <= {f.name for f in MethodConfig.__dataclass_fields__.values()}


# -- helpers -------------------------------------------------------------------------------
def base_of(model_dir, device="cpu"):
    return load_model(ModelConfig(path=str(model_dir), dtype="fp32", device=device))


def memorize_batch(tokenizer) -> dict:
    fmt = ChatFormat(tokenizer)
    rows = [fmt.render(conversation(r["instruction"]) + [{"role": "assistant", "content": r["output"]}])
            for r in MEMORIZE]
    return pad_batch(rows, tokenizer.pad_token_id)


def real_logits(net, batch) -> torch.Tensor:
    """Logits of the input's own positions (virtual-token methods prepend theirs)."""
    logits = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]


def loss_of(net, batch) -> torch.Tensor:
    labels = shift_labels(batch["labels"])
    return F.cross_entropy(real_logits(net, batch).flatten(0, 1), labels.flatten())


@torch.no_grad()
def eval_logits(net, batch) -> torch.Tensor:
    was = net.training
    net.eval()
    out = real_logits(net, batch)
    net.train(was)
    return out


@torch.no_grad()
def greedy_without_cache(net, prompt: list[int], n: int) -> list[int]:
    """The reference: the model's forward over the whole sequence at every step."""
    ids = torch.tensor([prompt], device=next(net.parameters()).device)
    for _ in range(n):
        logits = net(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, len(prompt):].tolist()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# -- the trained model of each case --------------------------------------------------------
@pytest.fixture(scope="module", params=PARAMS)
def case(request, tiny_qwen, tiny_llama, tmp_path_factory):
    name, options, lr, arch = request.param
    method = get(name)
    device = "cuda" if method.capabilities.needs_gpu and torch.cuda.is_available() else "cpu"
    if method.capabilities.needs_gpu and device == "cpu":
        pytest.skip(f"{name} needs a CUDA GPU (its CPU error is tested below)")
    model_dir = tiny_qwen if arch == "qwen2" else tiny_llama
    tokenizer = load_tokenizer(ModelConfig(path=str(model_dir)))
    batch = {k: v.to(device) for k, v in memorize_batch(tokenizer).items()}
    torch.manual_seed(0)
    cfg = replace(method.config_cls(), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = method.apply(base_of(model_dir, device), cfg)
    trainable, _ = count_parameters(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    net.train()
    losses = []
    for _ in range(STEPS):
        loss = loss_of(net, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    saved = tmp_path_factory.mktemp(f"saved-{name}") / "adapter"  # save creates it, as in train.py
    method.save(net, saved)
    net.eval()
    return dict(name=name, method=method, net=net, model_dir=model_dir, tokenizer=tokenizer, batch=batch,
                losses=losses, saved=saved, trainable=trainable, device=device)


def test_training_lowers_the_loss(case):
    losses = case["losses"]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses
    assert case["trainable"] > 0


def converted(case) -> bool:
    """PiSSA / OLoRA: saved as a plain LoRA of rank 2r against the untouched base, whose
    update is a difference of two large products: fp32 cancellation costs ~1e-4 in the logits."""
    config = getattr(case["net"], "peft_config", {}).get("default")
    return getattr(config, "init_lora_weights", True) in ("pissa", "olora")


def test_save_then_load_gives_identical_logits(case):
    method = case["method"]
    tolerance = 1e-3 if converted(case) else 5e-5  # fp32 rounding (logits are ~5 in size)
    expected = eval_logits(case["net"], case["batch"])
    loaded = method.load(base_of(case["model_dir"], case["device"]), case["saved"], False)
    assert max_diff(eval_logits(loaded, case["batch"]), expected) < tolerance
    assert count_parameters(loaded)[0] == 0  # loaded for inference: nothing trains
    # load(trainable=True) restores the state training had: same logits, same trainable size
    resumed = method.load(base_of(case["model_dir"], case["device"]), case["saved"], True)
    assert max_diff(eval_logits(resumed, case["batch"]), expected) < tolerance
    assert count_parameters(resumed)[0] == case["trainable"] * (2 if converted(case) else 1)


def test_merge_gives_the_same_logits_or_refuses_with_a_reason(case):
    method = case["method"]
    model = method.load(base_of(case["model_dir"], case["device"]), case["saved"], False)
    expected = eval_logits(model, case["batch"])
    if not method.capabilities.mergeable:
        with pytest.raises(NotMergeable) as refused:
            method.merge(model)
        message = str(refused.value)
        assert "merge" in message and "--method.name lora" in message, message
        return
    merged = method.merge(model)
    assert not hasattr(merged, "peft_config")
    assert type(merged).__name__.endswith("ForCausalLM")
    assert max_diff(eval_logits(merged, case["batch"]), expected) < (1e-3 if converted(case) else 1e-4)


def test_generation_with_a_cache_and_padding_uses_the_adapter(case):
    """model.generate (KV cache, left-padded batch) == a greedy loop over the full sequence."""
    net, tokenizer = case["net"], case["tokenizer"]
    fmt = ChatFormat(tokenizer)
    prompts = [fmt.prompt_ids(conversation(q)) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1  # the batch is padded
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts], device=case["device"])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=case["device"])
    with torch.no_grad():
        out = net.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
    stops = {tokenizer.eos_token_id, tokenizer.pad_token_id}

    def cut(ids: list[int]) -> list[int]:
        return ids[:next((i for i, t in enumerate(ids) if t in stops), len(ids))]

    assert [cut(row[width:]) for row in out.tolist()] == [cut(greedy_without_cache(net, p, 6)) for p in prompts]


def test_engine_answers_use_the_adapter(case, tmp_path):
    net, tokenizer = case["net"], case["tokenizer"]
    gen = GenerationConfig(max_new_tokens=8)
    try:
        engine = Engine(net, tokenizer)
    except ValueError as err:
        if case["name"] == "prefix":
            pytest.xfail(f"generate.py's Engine takes no prefix-tuning adapter yet: {err}")
        raise
    answers = engine.generate([conversation(q) for q in QUESTIONS], gen, batch_size=4)
    base_answers = Engine(base_of(case["model_dir"], case["device"]), tokenizer).generate(
        [conversation(q) for q in QUESTIONS], gen, batch_size=4)
    assert answers != base_answers
    prompt = engine.format.prompt_ids(conversation(QUESTIONS[0]))
    expected = engine.cut_at_stop(greedy_without_cache(net, prompt, 8))
    assert engine.complete([prompt], gen)[0] == expected


# -- QLoRA on a machine without a GPU -------------------------------------------------------
def test_qlora_on_cpu_says_what_to_do(tiny_qwen):
    method = get("qlora")
    assert method.capabilities.needs_gpu
    with pytest.raises(ConfigError) as refused:
        method.apply(base_of(tiny_qwen), method.config_cls())
    message = str(refused.value)
    assert "CUDA GPU" in message and "--method.name lora" in message, message


def test_qlora_adapter_is_usable_and_mergeable_on_cpu(tiny_qwen, tmp_path):
    """The saved adapter is plain LoRA: on CPU it loads on the full-precision base and merges."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(base_of(tiny_qwen), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False, task_type="CAUSAL_LM")).eval()
    net.save_pretrained(str(tmp_path))
    batch = memorize_batch(load_tokenizer(ModelConfig(path=str(tiny_qwen))))
    expected = eval_logits(net, batch)
    with pytest.warns(UserWarning, match="full-precision base"):
        loaded = get("qlora").load(base_of(tiny_qwen), tmp_path, False)
    assert max_diff(eval_logits(loaded, batch), expected) < 1e-5
    merged = get("qlora").merge(loaded)
    assert not hasattr(merged, "peft_config")
    assert max_diff(eval_logits(merged, batch), expected) < 1e-4


# -- P-Tuning ------------------------------------------------------------------------------
def test_ptuning_defaults_are_the_reference_settings(tiny_qwen):
    from tunelab.methods.ptuning import PTuningConfig, peft_config

    cfg = peft_config(PTuningConfig())
    assert (cfg.num_virtual_tokens, cfg.encoder_hidden_size, cfg.encoder_dropout) == (10, 1024, 0.1)
    assert cfg.encoder_reparameterization_type == "MLP"
    net = get("ptuning").apply(base_of(tiny_qwen), PTuningConfig())
    head = net.prompt_encoder["default"].mlp_head
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [1024, 1024, 32]
    with pytest.raises(ConfigError, match="method.ptuning.encoder"):
        PTuningConfig(encoder="gru")


def test_ptuning_changes_the_logits_and_disabling_it_gives_the_base(tiny_qwen):
    batch = memorize_batch(load_tokenizer(ModelConfig(path=str(tiny_qwen))))
    base_logits = eval_logits(base_of(tiny_qwen), batch)
    torch.manual_seed(0)
    net = get("ptuning").apply(base_of(tiny_qwen), get("ptuning").config_cls()).eval()
    assert max_diff(eval_logits(net, batch), base_logits) > 1e-2
    with net.disable_adapter():
        assert max_diff(eval_logits(net, batch), base_logits) < 1e-5
        with torch.no_grad():  # generation with the adapter off is the base's too
            ids = batch["input_ids"][:1, :8]
            off = net.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                               do_sample=False, pad_token_id=0)
    assert off[0, 8:].tolist() == greedy_without_cache(base_of(tiny_qwen), ids[0].tolist(), 4)


def test_ptuning_refuses_model_specific_helpers(tiny_qwen):
    """PEFT forwards unknown attributes to the base, so `model.chat(...)` would skip the
    virtual tokens; tunelab's P-Tuning model refuses it and says what to use."""
    from transformers import Qwen2ForCausalLM

    class RemoteCodeQwen(Qwen2ForCausalLM):
        def chat(self, tokenizer, query):
            return "the base model answering"

    base = RemoteCodeQwen.from_pretrained(str(tiny_qwen))
    net = get("ptuning").apply(base, get("ptuning").config_cls())
    with pytest.raises(AttributeError, match=r"without the virtual tokens.*model\.generate"):
        net.chat(None, "你是谁")
    assert not hasattr(net, "chat")
    assert net.get_base_model().chat(None, "x") == "the base model answering"  # deliberately, still possible
    assert net.config.model_type == "qwen2" and net.device.type == "cpu"  # generic attributes still pass
    assert net.get_input_embeddings() is base.get_input_embeddings()


def test_peft_alone_loses_the_ptuning_encoder_and_tunelab_keeps_it(tiny_qwen, tmp_path):
    """PEFT saves only the encoder's output and will not load a P-Tuning adapter for training;
    tunelab saves the encoder too and restores it exactly."""
    from peft import PeftModel
    from safetensors.torch import load_file

    batch = memorize_batch(load_tokenizer(ModelConfig(path=str(tiny_qwen))))
    torch.manual_seed(0)
    net = get("ptuning").apply(base_of(tiny_qwen), get("ptuning").config_cls())
    with torch.no_grad():
        for p in net.prompt_encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "trained"
    get("ptuning").save(net, tmp_path)
    expected = eval_logits(net, batch)
    with pytest.raises(ValueError, match="trainable"):  # PEFT cannot load it for training at all
        PeftModel.from_pretrained(base_of(tiny_qwen), str(tmp_path), is_trainable=True)
    inference_only = PeftModel.from_pretrained(base_of(tiny_qwen), str(tmp_path))
    assert set(inference_only.prompt_encoder["default"].state_dict()) == {"embedding.weight"}  # no MLP
    ours = get("ptuning").load(base_of(tiny_qwen), tmp_path, True)
    assert max_diff(eval_logits(ours, batch), expected) < 1e-6
    saved = load_file(str(tmp_path / "prompt_encoder.safetensors"))
    for key, value in ours.prompt_encoder["default"].state_dict().items():
        assert torch.equal(value, saved[key]), key
    (tmp_path / "prompt_encoder.safetensors").unlink()  # an adapter saved by PEFT alone
    with pytest.raises(ValueError, match="cannot continue"):
        get("ptuning").load(base_of(tiny_qwen), tmp_path, True)
    assert max_diff(eval_logits(get("ptuning").load(base_of(tiny_qwen), tmp_path, False), batch), expected) < 1e-6


def test_ptuning_training_continues_from_a_checkpoint(tiny_qwen, tmp_path):
    """3 steps + resume for 3 more == 6 steps straight; the loss does not go back to the start."""
    from safetensors.torch import load_file

    from tunelab.train import train

    data = write_jsonl(tmp_path / "data.jsonl", MEMORIZE * 2)

    def run(out, steps):
        train(ModelConfig(path=str(tiny_qwen), device="cpu", dtype="fp32"), DataConfig(path=str(data)),
              MethodConfig(name="ptuning"),
              TrainConfig(max_steps=steps, batch_size=4, micro_batch_size=4, lr=1e-3, schedule="constant",
                          warmup_ratio=0, save_every=3, log_every=1, packing="off"), out=str(out),
              allow_config_change=True)  # max_steps 3 -> 6; the constant schedule does not change
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    straight = {r["step"]: r["loss"] for r in run(tmp_path / "straight", 6)}
    run(tmp_path / "resumed", 3)
    resumed = {r["step"]: r["loss"] for r in run(tmp_path / "resumed", 6)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-4, abs=1e-5), (step, resumed, straight)
    assert resumed[4] < resumed[1] - 0.05  # continues from step 3, not from the start
    # the checkpoint's encoder is what a trainable load restores
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step-0000003" / "adapter"
    saved = load_file(str(checkpoint / "prompt_encoder.safetensors"))
    reloaded = get("ptuning").load(base_of(tiny_qwen), checkpoint, True).prompt_encoder["default"]
    assert saved.keys() == reloaded.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in reloaded.state_dict().items())


# -- freeze and full specifics ---------------------------------------------------------------
def test_freeze_trains_only_the_last_layers_and_names_the_flag(tiny_qwen):
    from tunelab.methods.freeze import FreezeConfig

    net = get("freeze").apply(base_of(tiny_qwen), FreezeConfig(layers=1))
    trained = {n.split(".")[2] for n, p in net.named_parameters() if p.requires_grad}
    assert trained == {"1"}  # layer 1 of 2
    with pytest.raises(ConfigError, match="method.freeze.layers"):
        get("freeze").apply(base_of(tiny_qwen), FreezeConfig(layers=3))
    with pytest.raises(ConfigError, match="model.model.layers"):
        get("freeze").apply(torch.nn.Linear(2, 2), FreezeConfig())


def test_full_without_embeddings_keeps_them_frozen_after_reload(tiny_qwen, tmp_path):
    from tunelab.methods.full import FullConfig

    net = get("full").apply(base_of(tiny_qwen), FullConfig(train_embeddings=False))
    assert not net.get_input_embeddings().weight.requires_grad
    get("full").save(net, tmp_path)
    resumed = get("full").load(base_of(tiny_qwen), tmp_path, True)
    assert count_parameters(resumed)[0] == count_parameters(net)[0]
    assert not resumed.get_input_embeddings().weight.requires_grad


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_prefix_starts_as_the_bases_own_keys_and_values(arch):
    """`init: activations`: the prefix PEFT places in every layer is exactly the cache the base
    computes for its first special token repeated, so the layout (layers, keys/values, heads)
    is PEFT's; `random` is PEFT's N(0, 1) embedding."""
    from tunelab.methods.prefix import PrefixConfig

    base = build_model(arch, len(build_tokenizer()), seed=0).eval()
    token = base.config.bos_token_id if isinstance(base.config.bos_token_id, int) else (
        base.config.pad_token_id if isinstance(base.config.pad_token_id, int) else 0)
    ids = torch.full((1, 5), token)
    with torch.no_grad():
        want = base(input_ids=ids, use_cache=True).past_key_values
    net = get("prefix").apply(base, PrefixConfig(num_virtual_tokens=5)).eval()
    with torch.no_grad():
        got = net.get_prompt(batch_size=1)
    for mine, theirs in zip(got.layers, want.layers):
        torch.testing.assert_close(mine.keys, theirs.keys)
        torch.testing.assert_close(mine.values, theirs.values)
    random = get("prefix").apply(build_model(arch, len(build_tokenizer()), seed=0),
                                 PrefixConfig(num_virtual_tokens=5, init="random"))
    weight = random.prompt_encoder[random.active_adapter].embedding.weight
    assert 0.8 < weight.std().item() < 1.2  # PEFT's own init


def test_prefix_refuses_gradient_checkpointing_before_any_work(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", MEMORIZE)
    from tunelab.train import train

    with pytest.raises(ConfigError, match="--train.gradient_checkpointing"):
        train(ModelConfig(path=str(tmp_path / "no-model-needed")), DataConfig(path=str(data)),
              MethodConfig(name="prefix"), TrainConfig(gradient_checkpointing=True), out=str(tmp_path / "run"))
    assert not (tmp_path / "run" / "config.yaml").exists()

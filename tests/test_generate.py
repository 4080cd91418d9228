"""The generation engine: batched answers equal one-at-a-time answers, each adapter on the
shared base gives the logits of a freshly loaded model with only that adapter, sampling is
reproducible with a seed, and the speed benchmark's script runs (CPU mode)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import build_tokenizer, save_tiny
from tunelab.config import GenerationConfig
from tunelab.generate import BASE, Engine, column_major_weights, left_pad, shared_prefix_length

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["你是谁？", "Who are you?", "What is the capital of France? Answer in one word please.",
             "1.11 和 1.9 哪个大？", "hi", "The quick brown fox jumps over the lazy dog. 0123456789"]
N_VIRTUAL = 4


def conversations() -> list[list[dict]]:
    system = {"role": "system", "content": "现在你要扮演皇帝身边的女人--甄嬛"}
    return [[system, {"role": "user", "content": q}] for q in QUESTIONS]


# -- tiny models and runs ------------------------------------------------------------------
def save_peaked(directory: Path, arch: str) -> Path:
    """A tiny model whose logits are far from flat, so greedy decoding has no near-ties."""
    from transformers import AutoModelForCausalLM

    save_tiny(directory, arch, pad_is_eos=arch == "llama")
    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # tied for llama: embeddings scale too
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def base_dir(request, tmp_path_factory) -> Path:
    return save_peaked(tmp_path_factory.mktemp(f"peaked-{request.param}"), request.param)


def peft_config(kind: str):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig

    if kind == "prefix":
        return PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL, task_type="CAUSAL_LM")
    if kind == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM")
    if kind == "lora":  # init_lora_weights=False: B is random, so the adapter changes the logits
        return LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                          init_lora_weights=False, task_type="CAUSAL_LM")
    return PromptEncoderConfig(num_virtual_tokens=N_VIRTUAL, encoder_hidden_size=16,
                               encoder_reparameterization_type="MLP", task_type="CAUSAL_LM")


METHOD_OF = {"lora": "lora", "lora2": "lora", "ptuning": "ptuning", "prefix": "prefix", "ia3": "ia3",
             "full": "full"}


def make_run(root: Path, base: Path, kind: str, seed: int = 0) -> Path:
    """A finished run directory with a random (non-trivial) adapter of `kind` on `base`."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = root / f"run-{kind}-{seed}"
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           peft_config({"lora2": "lora", "full": "lora"}.get(kind, kind)))
    if kind != "ptuning":
        with torch.no_grad():  # a visible delta: LoRA's default init leaves B random but small
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    model.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    config = {"model": {"path": str(base), "dtype": "fp32", "device": "cpu"},
              "method": {"name": METHOD_OF[kind]}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "DONE").write_text("ok\n")
    return run


def fresh(run: Path):
    """A freshly loaded base with only this run's adapter (what the engine must reproduce)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = yaml.safe_load((run / "config.yaml").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["model"]["path"])
    return PeftModel.from_pretrained(base, str(run / "adapter")).eval()


@pytest.fixture(scope="module")
def runs(base_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {"lora": make_run(root, base_dir, "lora", 1), "lora2": make_run(root, base_dir, "lora2", 2),
            "ptuning": make_run(root, base_dir, "ptuning", 3), "prefix": make_run(root, base_dir, "prefix", 6)}


def greedy_one_at_a_time(model, tokenizer, engine: Engine, max_new_tokens: int) -> list[list[int]]:
    """The reference recipe's loop: one unpadded prompt per `generate` call."""
    answers = []
    for messages in conversations():
        ids = torch.tensor([engine.format.prompt_ids(messages)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=engine.stop_ids,
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None, top_k=None)
        answers.append(engine.cut_at_stop(out[0, ids.shape[1]:].tolist()))
    return answers


def greedy_by_hand(model, engine: Engine, max_new_tokens: int, n_virtual: int = 0) -> list[list[int]]:
    """Greedy decoding from full forward passes (no cache, no padding): the plain meaning of
    "this model's greedy answer". Used for PEFT P-Tuning because PEFT 0.21's own generate
    re-inserts the virtual tokens at every decoding step under transformers 5.24, whose
    generate names the cache `cache` where PEFT looks for `past_key_values`."""
    answers = []
    for messages in conversations():
        ids = engine.format.prompt_ids(messages)
        new: list[int] = []
        while len(new) < max_new_tokens and (not new or new[-1] not in engine.stop_ids):
            with torch.no_grad():
                new.append(int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
        answers.append(engine.cut_at_stop(new))
    return answers


# -- tests ---------------------------------------------------------------------------------
def test_left_pad():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix_length([[7, 8, 9]]) == 2
    assert shared_prefix_length([[1], [1, 2]]) == 0
    assert shared_prefix_length([[1, 2], [3, 2]]) == 0


def test_column_major_weights_change_the_layout_not_the_model(base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    ids = torch.tensor([[5, 9, 17, 33, 2, 8]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        column_major_weights(model)
        after = model(input_ids=ids).logits
    for name, module in model.named_modules():
        if name in weights:
            assert not module.weight.is_contiguous() and torch.equal(module.weight, weights[name]), name
    assert (after - before).abs().max() < 1e-5


def test_batched_greedy_equals_one_at_a_time(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    engine = Engine(model, tokenizer)
    gen = GenerationConfig(max_new_tokens=24)
    prompts = [engine.format.prompt_ids(m) for m in conversations()]
    assert len({len(p) for p in prompts}) > 3  # the batch really is padded
    batched = engine.complete(prompts, gen, batch_size=len(prompts))
    assert batched == greedy_one_at_a_time(model, tokenizer, engine, 24)
    assert any(len(a) > 5 for a in batched)


def test_each_adapter_matches_a_fresh_model(runs):
    engine = Engine.from_runs(runs)
    assert engine.adapters == [BASE, "lora", "lora2", "ptuning", "prefix"]
    # one base in memory: the prefix-tuning wrapper holds the same base module and adds only
    # its prompt encoder; the LoRA adapters live inside that base's layers; P-Tuning is kept
    # as its [n_virtual, hidden] embeddings
    wrapper = engine.prefix["prefix"]
    assert wrapper.get_base_model() is engine.base and engine.lora.get_base_model() is engine.base
    in_base = {id(p) for p in engine.base.parameters()}
    added = [n for n, p in wrapper.named_parameters() if id(p) not in in_base]
    assert added and all("prompt_encoder" in n for n in added), added
    assert engine.virtual["ptuning"].shape == (N_VIRTUAL, engine.base.config.hidden_size)
    prompts = [engine.format.prompt_ids(m) for m in conversations()]
    worst = {}
    for name in engine.adapters:
        if name == BASE:
            from transformers import AutoModelForCausalLM

            reference = AutoModelForCausalLM.from_pretrained(yaml.safe_load(
                (runs["lora"] / "config.yaml").read_text())["model"]["path"]).eval()
        else:
            reference = fresh(runs[name])
        n_virtual = N_VIRTUAL if name == "ptuning" else 0
        diffs = []
        for ids in prompts:
            with torch.no_grad():
                expected = reference(input_ids=torch.tensor([ids])).logits[0, n_virtual:]
            diffs.append((engine.logits(ids, adapter=name) - expected).abs().max().item())
        worst[name] = max(diffs)
        # and the answers: batched on the shared base == one at a time on the fresh model
        gen = GenerationConfig(max_new_tokens=16)
        assert engine.complete(prompts, gen, batch_size=4, adapter=name) == \
            greedy_by_hand(reference, engine, 16, n_virtual), name
    print("max |logit diff| vs a fresh model:", worst)
    assert all(d < 5e-4 for d in worst.values()), worst  # fp32 rounding through an unmerged adapter
    # the adapters really differ from each other
    ids = prompts[0]
    logits = {name: engine.logits(ids, adapter=name) for name in engine.adapters}
    for a in engine.adapters:
        for b in engine.adapters:
            if a < b:
                assert (logits[a] - logits[b]).abs().max() > 1e-2, (a, b)


def test_teacher_forced_batches_match_single_rows(runs):
    """Engine.forward on a left-padded batch (evaluation's scoring path) == one row at a time."""
    engine = Engine.from_runs(runs)
    prompts = [engine.format.prompt_ids(m) for m in conversations()]
    ids, mask = left_pad(prompts, engine.tokenizer.pad_token_id)
    for name in engine.adapters:
        logits = engine.forward(ids, mask, adapter=name)
        assert logits.shape[:2] == ids.shape
        for row, prompt in enumerate(prompts):
            single = engine.logits(prompt, adapter=name)
            assert (logits[row, -len(prompt):].float() - single).abs().max() < 1e-4, name


def test_rows_that_end_early_leave_the_batch_and_the_rest_answer_as_with_generate(runs):
    """Engine.complete drops finished rows from its batch; every answer equals the one the
    model's own `generate` gives the whole padded batch (which keeps finished rows)."""
    engine = Engine.from_runs(runs)
    prompts = [engine.format.prompt_ids(m) for m in conversations()]
    gen = GenerationConfig(max_new_tokens=16)
    for name in (BASE, "lora", "ptuning"):
        free = engine.complete(prompts, gen, batch_size=len(prompts), adapter=name, ignore_eos=True)
        # stop at a token some answers reach early and others late or never
        counts = {t: sum(t in a[:-2] for a in free) for t in {t for a in free for t in a}}
        engine.stop_ids = [max(counts, key=lambda t: (0 < counts[t] < len(prompts), counts[t]))]
        ids, mask = left_pad(prompts, engine.tokenizer.pad_token_id)
        expected = [engine.cut_at_stop(a) for a in
                    engine._run(ids, mask, name, None, **engine._generate_kwargs(gen)).tolist()]
        answers = engine.complete(prompts, gen, batch_size=len(prompts), adapter=name)
        engine.stop_ids = engine._stop_ids()
        assert answers == expected, name
        assert min(map(len, answers)) < 14 and max(map(len, answers)) == 16, (name, answers)


def test_scoring_only_the_supervised_positions_gives_the_full_logits_loss(runs):
    """score_rows computes the LM head from the batch's first supervised position on; the
    summed loss equals the one from every position's logits, for every adapter."""
    import torch.nn.functional as F

    from tunelab.data import IGNORE
    from tunelab.evaluate.common import score_rows

    engine = Engine.from_runs(runs)
    rows = [engine.format.render(m + [{"role": "assistant", "content": a}], 128, "all", "prompt")
            for m, a in zip(conversations(), ["我是甄嬛。", "An assistant.", "Paris.", "1.9", "hello", "ok"])]
    for name in engine.adapters:
        scored = score_rows(engine, rows, name, batch_size=4)
        assert engine.forward(*left_pad([rows[0].input_ids], 0), adapter=name, keep_last=2).shape[1] == 2
        for row, (nll, count) in zip(rows, scored):
            logits = engine.logits(row.input_ids, adapter=name)[:-1]
            labels = torch.tensor(row.labels[1:])
            full = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            assert count == int((labels != IGNORE).sum()) and abs(nll - full) < 1e-3 * max(1.0, full), name


def test_a_failed_stream_raises_instead_of_hanging(runs, monkeypatch):
    engine = Engine.from_runs({"lora": runs["lora"]})

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine, "_run", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        list(engine.stream(conversations()[0]))


def test_virtual_tokens_added_before_a_lora(base_dir, tmp_path):
    """Order of adding must not matter: P-Tuning first, then LoRA onto the same base."""
    runs = {"ptuning": make_run(tmp_path, base_dir, "ptuning", 3), "lora": make_run(tmp_path, base_dir, "lora", 1)}
    engine = Engine.from_runs(runs)
    ids = engine.format.prompt_ids(conversations()[0])
    for name, run in runs.items():
        n_virtual = N_VIRTUAL if name == "ptuning" else 0
        with torch.no_grad():
            expected = fresh(run)(input_ids=torch.tensor([ids])).logits[0, n_virtual:]
        assert (engine.logits(ids, adapter=name) - expected).abs().max() < 1e-4, name


def test_engine_from_load_run_keeps_its_adapter(runs):
    """chat's path: load_run's PEFT model goes straight into an Engine."""
    from tunelab.runs import load_run

    for name in ("lora", "ptuning", "prefix"):
        model, tokenizer, _ = load_run(runs[name])
        engine = Engine(model, tokenizer)
        assert engine.active != BASE and engine.adapters[0] == BASE
        ids = engine.format.prompt_ids(conversations()[1])
        n_virtual = N_VIRTUAL if name == "ptuning" else 0
        with torch.no_grad():
            expected = fresh(runs[name])(input_ids=torch.tensor([ids])).logits[0, n_virtual:]
        assert (engine.logits(ids) - expected).abs().max() < 1e-4
        streamed = "".join(engine.stream(conversations()[1], GenerationConfig(max_new_tokens=12))).strip()
        assert streamed == engine.generate([conversations()[1]], GenerationConfig(max_new_tokens=12))[0]


def test_use_switches_the_default_adapter_and_rejects_unknown(runs):
    engine = Engine.from_runs({"lora": runs["lora"]})
    ids = engine.format.prompt_ids(conversations()[0])
    engine.use("lora")
    with_lora = engine.logits(ids)
    engine.use(BASE)
    assert (engine.logits(ids) - with_lora).abs().max() > 1e-2
    assert torch.equal(engine.logits(ids, adapter="lora"), with_lora)
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.use("nope")
    with pytest.raises(ValueError, match="taken"):
        engine.add_adapter("lora", runs["lora"])


def test_adapters_that_cannot_share_the_base_are_refused(base_dir, tmp_path):
    engine = Engine.from_runs({"lora": make_run(tmp_path, base_dir, "lora", 1)})
    with pytest.raises(ValueError, match="cannot switch"):  # PEFT holds one tuner type per model
        engine.add_adapter("ia3", make_run(tmp_path, base_dir, "ia3", 4))
    with pytest.raises(ValueError, match="changes the base weights"):  # full fine-tuning
        engine.add_adapter("full", make_run(tmp_path, base_dir, "full", 5))
    assert engine.adapters == [BASE, "lora"]


def make_whole_run(root: Path, base: Path, kind: str) -> Path:
    """A finished freeze or full run: the base's weights (its last layer's, for freeze) moved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.methods import get

    run = root / f"run-{kind}"
    method = get(kind)
    torch.manual_seed(7)
    options = method.config_cls(layers=1) if kind == "freeze" else method.config_cls()
    model = method.apply(AutoModelForCausalLM.from_pretrained(base), options)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    method.save(model, run / "adapter")
    AutoTokenizer.from_pretrained(base).save_pretrained(run / "tokenizer")
    config = {"model": {"path": str(base), "dtype": "fp32", "device": "cpu"}, "method": {"name": kind}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "DONE").write_text("ok\n")
    return run


@pytest.mark.parametrize("kind", ["freeze", "full"])
def test_a_run_that_replaced_the_base_weights_gets_an_engine_of_its_own(base_dir, runs, tmp_path, kind):
    """Freeze and full runs: their engine serves the run's weights under its name, as
    `load_run` gives them, has no base, and refuses adapters trained on the base."""
    from tunelab.config import ModelConfig
    from tunelab.runs import load_run

    run = make_whole_run(tmp_path, base_dir, kind)
    engine = Engine.from_runs({kind: run})
    assert engine.adapters == [kind] and engine.active == kind
    reference = load_run(run)[0]
    base = Engine.from_runs({}, model=ModelConfig(path=str(base_dir)))
    ids = engine.format.prompt_ids(conversations()[0])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([ids])).logits[0]
    assert (engine.logits(ids, adapter=kind) - expected).abs().max() < 1e-4
    assert (engine.logits(ids) - base.logits(ids)).abs().max() > 1e-2  # not the base's answers
    gen = GenerationConfig(max_new_tokens=12)
    prompts = [engine.format.prompt_ids(m) for m in conversations()]
    assert engine.complete(prompts, gen, batch_size=4, adapter=kind) == greedy_by_hand(reference, engine, 12)
    with pytest.raises(ValueError, match="unknown adapter"):
        engine.logits(ids, adapter=BASE)
    with pytest.raises(ValueError, match="own weights, not the base"):
        engine.add_adapter("lora", runs["lora"])


def test_sampling_is_reproducible_with_a_seed(runs):
    engine = Engine.from_runs({"lora": runs["lora"], "ptuning": runs["ptuning"]})
    rng_before = torch.get_rng_state()
    for adapter in engine.adapters:
        gen = GenerationConfig(max_new_tokens=12, temperature=1.5, seed=7)
        first = engine.generate(conversations(), gen, batch_size=3, adapter=adapter)
        assert engine.generate(conversations(), gen, batch_size=3, adapter=adapter) == first
        other = engine.generate(conversations(), GenerationConfig(max_new_tokens=12, temperature=1.5, seed=8),
                                batch_size=3, adapter=adapter)
        assert other != first, adapter
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's RNG is untouched


def test_stops_at_end_of_turn_not_eos():
    """pad == eos == <|im_end|> for llama here; the stop set is the template's end of turn."""
    tok = build_tokenizer()
    from conftest import build_model

    engine = Engine(build_model("qwen2", len(tok)).eval(), tok)
    assert engine.stop_ids[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert engine.cut_at_stop([5, 6, engine.stop_ids[0], 7]) == [5, 6]


def test_speed_bench_runs_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("generate_speed", ROOT / "bench" / "generate_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tok_dir = tmp_path / "tok"
    build_tokenizer().save_pretrained(tok_dir)
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": q, "input": "", "output": "x"} for q in QUESTIONS * 2],
                               ensure_ascii=False))
    out = tmp_path / "result.json"
    result = bench.main(["--data", str(data), "--tokenizer", str(tok_dir), "--random-weights", "tiny",
                         "--device", "cpu", "--prompts", "12", "--reference-prompts", "4",
                         "--max-new-tokens", "8", "--batch-size", "6", "--decode", "auto", "static",
                         "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == result
    assert result["engine"]["prompts"] == 12 and result["reference"]["prompts"] == 4
    assert [e["decode"] for e in result["engines"]] == ["dynamic", "static"]  # auto on a CPU: dynamic
    assert result["engines"][1]["new_tokens"] == 12 * 8
    assert result["engine"]["new_tokens"] == 12 * 8  # EOS ignored: every prompt did the same work
    assert result["match"]["compared"] == 4 and result["match"]["exact"] == 4  # fp32: identical


def test_static_buffers_decode_as_the_dynamic_cache(runs):
    """The GPU's decoding path (fixed KV buffers, a 4D mask, steps that a CUDA graph can
    replay; generate/static.py), run eagerly here, gives the dynamic path's greedy answers for
    every adapter that shares the base, with and without an end of turn, over batches whose
    prompts share a system prompt or nothing at all."""
    engine = Engine.from_runs(runs)
    assert not engine.static  # a CPU engine keeps the dynamic cache (rows leave the batch)
    prompts = [engine.format.prompt_ids(m) for m in conversations()]
    bare = [engine.format.prompt_ids([m[1]]) for m in conversations()]  # no shared system prompt
    gen = GenerationConfig(max_new_tokens=20)
    for name in (BASE, "lora", "lora2", "ptuning"):
        for batch in (prompts, bare):
            for ignore_eos in (False, True):
                engine.static = False
                expected = engine.complete(batch, gen, batch_size=4, adapter=name, ignore_eos=ignore_eos)
                engine.static = True
                got = engine.complete(batch, gen, batch_size=4, adapter=name, ignore_eos=ignore_eos)
                assert got == expected, (name, ignore_eos)
    # a repetition penalty < 1 favours seen tokens: a pad counted as seen would show
    penalised = GenerationConfig(max_new_tokens=20, repetition_penalty=0.5)
    for static in (False, True):
        engine.static = static
        got = engine.complete(bare, penalised, batch_size=len(bare))
        assert static is False or got == expected_penalised
        expected_penalised = got
    engine.static = False
    free = engine.complete(prompts, gen, batch_size=len(prompts), ignore_eos=True)
    # a stop token some rows reach early and others never: rows that finished keep decoding
    # in the static batch, and their answers are still cut after their first stop
    counts = {t: sum(t in a[:-2] for a in free) for t in {t for a in free for t in a}}
    engine.stop_ids = [max(counts, key=lambda t: (0 < counts[t] < len(prompts), counts[t]))]
    expected = engine.complete(prompts, gen, batch_size=len(prompts))
    engine.static = True
    assert engine.complete(prompts, gen, batch_size=len(prompts)) == expected
    assert min(map(len, expected)) < 18 and max(map(len, expected)) == 20
    # buffers are reused across batches of the same shape, a few shapes at most
    assert len(engine.decoder.slots) <= engine.decoder.keep


def test_a_batch_that_refills_itself_answers_as_one_prompt_at_a_time(runs, monkeypatch):
    """The CPU's decoding (generate/ring.py): 2-3 places for 12 prompts of many lengths;
    prompts join as answers end, the ring of key/value columns wraps around, the last rows
    are packed into fewer places, and every answer is still the one-at-a-time answer: for
    the base with a repetition penalty (left padding never counts as a seen token) and for
    each adapter."""
    from tunelab.generate import ring as dynamic_decode

    engine = Engine.from_runs(runs)
    questions = QUESTIONS + [q * 3 for q in QUESTIONS]  # long prompts join after short ones
    system = conversations()[0][0]
    convs = [[system, {"role": "user", "content": q}] for q in questions]
    prompts = [engine.format.prompt_ids(m) for m in convs]
    columns, packs = [], []
    step, pack = dynamic_decode.Ring.step, dynamic_decode.Ring.pack

    def stepped(ring, *a):
        columns.append((ring.next, ring.capacity))
        step(ring, *a)

    def packed(ring):
        packs.append((ring.rows, ring.live()))
        pack(ring)

    monkeypatch.setattr(dynamic_decode.Ring, "step", stepped)
    monkeypatch.setattr(dynamic_decode.Ring, "pack", packed)
    # the fewest columns that can work (longest prompt + answer): the ring wraps, tightly
    monkeypatch.setattr(dynamic_decode, "capacity_for", lambda width, new: width + new)
    base = engine.base
    gen = GenerationConfig(max_new_tokens=24, repetition_penalty=0.5)  # < 1 favours seen tokens: a pad counted as seen would show
    # a stop token some answers reach early and others late or never: rows leave mid-way
    free = engine.complete(prompts, gen, batch_size=len(prompts), adapter=BASE, ignore_eos=True)
    counts = {t: sum(t in a[:-4] for a in free) for t in {t for a in free for t in a}}
    monkeypatch.setattr(engine, "stop_ids", [max(counts, key=lambda t: (0 < counts[t] < len(prompts) - 2,
                                                                       counts[t]))])
    expected = []
    for ids in prompts:
        with torch.no_grad(), engine._deltas_off():
            out = base.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                **engine._generate_kwargs(gen))
        expected.append(engine.cut_at_stop(out[0, len(ids):].tolist()))
    assert engine.complete(prompts, gen, batch_size=2, adapter=BASE) == expected
    assert len({len(a) for a in expected}) > 2  # answers end at different steps: rows join mid-way
    assert packs and all(live <= rows // 2 for rows, live in packs)
    # one place, every answer 24 tokens: 288 steps go more than once around the ring
    full = GenerationConfig(max_new_tokens=24)
    expected = []
    for ids in prompts:
        with torch.no_grad(), engine._deltas_off():
            out = base.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                **engine._generate_kwargs(full, ignore_eos=True))
        expected.append(out[0, len(ids):].tolist())
    columns.clear()
    assert engine.complete(prompts, full, batch_size=1, adapter=BASE, ignore_eos=True) == expected
    capacity = columns[0][1]
    assert len(columns) > capacity and capacity - 1 in {c for c, _ in columns}
    for name, n_virtual in (("lora", 0), ("ptuning", N_VIRTUAL)):
        plain = GenerationConfig(max_new_tokens=12)
        reference = fresh(runs[name])
        by_hand = []
        for ids in prompts:
            new: list[int] = []
            while len(new) < 12 and (not new or new[-1] not in engine.stop_ids):
                with torch.no_grad():
                    new.append(int(reference(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax()))
            by_hand.append(engine.cut_at_stop(new))
        assert engine.complete(prompts, plain, batch_size=3, adapter=name) == by_hand, name

"""Merge and export: the written directory loads with plain transformers (no tunelab),
computes what the adapter on its base computes, stops at the template's end of turn, is
written crash-safely, and P-Tuning bakes into new tokens that can never be generated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_generate import N_VIRTUAL, base_dir, conversations, fresh, make_run  # noqa: F401
from tunelab.config import GenerationConfig
from tunelab.data.template import ChatFormat
from tunelab.generate import Engine
from tunelab.merge import EXPORT_INFO, ExportMismatch, NotMergeable, merge

# Runs in a fresh interpreter: what a user without tunelab does with the directory.
PLAIN_LOAD = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
directory, conversations = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
out = {"logits": [], "ids": [], "answers": []}
for messages in conversations:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    ids = torch.tensor([list(ids)])
    with torch.no_grad():
        out["logits"].append(model(input_ids=ids).logits[0].tolist())
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, output_scores=True, return_dict_in_generate=True)
    out["ids"].append(ids[0].tolist())
    out["answers"].append(new.sequences[0, ids.shape[1]:].tolist())
    out.setdefault("scores", []).append([s[0].tolist() for s in new.scores])
assert "tunelab" not in sys.modules
print(json.dumps(out))
"""


def load_plainly(directory: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(directory),
                             json.dumps(conversations(), ensure_ascii=False)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def close(got, want, rel: float = 1e-4) -> bool:
    """fp32 agreement: max |difference| <= 1e-4 x the largest |logit| (when above 1)."""
    got, want = torch.as_tensor(got), torch.as_tensor(want)
    return (got - want).abs().max().item() <= rel * max(1.0, want.abs().max().item())


def adapter_logits(run: Path, ids: list[int], n_virtual: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return fresh(run)(input_ids=torch.tensor([ids])).logits[0, n_virtual:]


def test_merged_lora_loads_without_tunelab(base_dir, tmp_path):
    run = make_run(tmp_path, base_dir, "lora", 1)
    out = merge(str(run), str(tmp_path / "merged"))
    files = {p.name for p in out.iterdir()}
    assert any(f.endswith(".safetensors") for f in files) and "config.json" in files
    assert not any("adapter" in f for f in files)
    assert not (tmp_path / "merged.tmp").exists()
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["kind"] == "merged" and info["max_abs_diff"] <= info["tolerance"] < 1e-2
    print("merged vs adapter-on-base max |logit diff|:", info["max_abs_diff"], info["reloaded_max_abs_diff"])

    plain = load_plainly(out)
    from transformers import AutoTokenizer

    fmt = ChatFormat(AutoTokenizer.from_pretrained(run / "tokenizer"))
    for messages, ids, logits in zip(conversations(), plain["ids"], plain["logits"]):
        assert ids == fmt.prompt_ids(messages)  # the exported template renders as training did
        assert close(logits, adapter_logits(run, ids))
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert eos[0] == fmt.end_of_turn_id
    # the plain model's greedy answers are the engine's answers with the adapter
    engine = Engine.from_runs({"lora": run})
    expected = engine.complete(plain["ids"], GenerationConfig(max_new_tokens=12), adapter="lora")
    assert [engine.cut_at_stop(a) for a in plain["answers"]] == expected


def test_bf16_export_is_checked_with_a_looser_tolerance(base_dir, tmp_path):
    run = make_run(tmp_path, base_dir, "lora", 1)
    out = merge(str(run), str(tmp_path / "merged"), dtype="bf16")
    info = json.loads((out / EXPORT_INFO).read_text())
    assert info["dtype"] == "bfloat16" and info["max_abs_diff"] <= info["tolerance"]
    assert info["cast_max_abs_diff"] > info["max_abs_diff"]  # bf16 rounding shows and is reported
    assert info["reloaded_max_abs_diff"] <= 1e-6  # the files hold exactly the model that was checked
    config = json.loads((out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_failed_check_leaves_the_old_directory(base_dir, tmp_path, monkeypatch):
    import tunelab.merge as merge_module

    run = make_run(tmp_path, base_dir, "lora", 1)
    target = tmp_path / "merged"
    target.mkdir()
    (target / EXPORT_INFO).write_text("{}")  # an earlier export: the only kind replaced without asking
    (target / "old.txt").write_text("previous export")

    def broken(*args, **kwargs):
        raise ExportMismatch("simulated")

    monkeypatch.setattr(merge_module, "check_reloaded", broken)
    with pytest.raises(ExportMismatch):
        merge(str(run), str(target))
    assert sorted(p.name for p in target.iterdir()) == sorted([EXPORT_INFO, "old.txt"])
    assert not (tmp_path / "merged.tmp").exists()


def test_non_finite_adapter_is_refused(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    run = make_run(tmp_path, base_dir, "lora", 1)
    weights = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    with pytest.raises((ExportMismatch, FloatingPointError)):
        merge(str(run), str(tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


def test_ptuning_is_not_mergeable_and_says_what_to_do(base_dir, tmp_path):
    run = make_run(tmp_path, base_dir, "ptuning", 3)
    with pytest.raises(NotMergeable, match="--bake") as err:
        merge(str(run), str(tmp_path / "merged"))
    assert "tunelab chat --run" in str(err.value)
    lora = make_run(tmp_path, base_dir, "lora", 1)
    with pytest.raises(Exception, match="without `--bake true`"):
        merge(str(lora), str(tmp_path / "merged"), bake=True)


def test_baked_ptuning_equals_peft_and_never_emits_its_tokens(base_dir, tmp_path):
    run = make_run(tmp_path, base_dir, "ptuning", 3)
    out = merge(str(run), str(tmp_path / "baked"), bake=True)
    info = json.loads((out / EXPORT_INFO).read_text())
    virtual_ids = info["virtual_token_ids"]
    assert len(virtual_ids) == N_VIRTUAL and info["max_abs_diff"] <= info["tolerance"]
    print("baked vs PEFT P-Tuning max |logit diff| on the real tokens:", info["max_abs_diff"],
          info["reloaded_max_abs_diff"], "head untied" if info["untied_head"] else "")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # a tied base (llama here) was untied

    plain = load_plainly(out)
    for ids, logits, scores in zip(plain["ids"], plain["logits"], plain["scores"]):
        assert ids[:N_VIRTUAL] == virtual_ids  # the template puts them first, like PEFT
        real = ids[N_VIRTUAL:]
        assert not set(real) & set(virtual_ids)
        want = adapter_logits(run, real, N_VIRTUAL)
        assert close(torch.tensor(logits)[N_VIRTUAL:, :want.shape[1]], want)
        # their head rows are zero: logit 0 even in a runtime that ignores suppress_tokens
        assert all(row[i] == 0 for row in logits for i in virtual_ids)
        for step in scores:  # and suppressed at every step: they can never be generated
            assert all(step[i] == float("-inf") for i in virtual_ids)
    # the engine with the adapter and the baked model answer alike, batched
    engine = Engine.from_runs({"ptuning": run})
    prompts = [ids[N_VIRTUAL:] for ids in plain["ids"]]
    expected = engine.complete(prompts, GenerationConfig(max_new_tokens=12), batch_size=3, adapter="ptuning")
    assert [engine.cut_at_stop(a) for a in plain["answers"]] == expected
    from transformers import AutoModelForCausalLM, AutoTokenizer

    baked = Engine(AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out))
    assert baked.generate(conversations(), GenerationConfig(max_new_tokens=12), batch_size=3) == \
        engine.generate(conversations(), GenerationConfig(max_new_tokens=12), batch_size=3, adapter="ptuning")


def test_cli_merge(base_dir, tmp_path):
    from tunelab.cli import main

    run = make_run(tmp_path, base_dir, "lora", 1)
    main(["merge", str(run), "--out", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "config.json").is_file()
    main(["merge", str(run)])
    assert (run / "merged" / "config.json").is_file()
    with pytest.raises(SystemExit) as exit_:
        main(["merge", str(make_run(tmp_path, base_dir, "ptuning", 3)), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2

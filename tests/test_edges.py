"""What a new user hit (issue 23, part 2): nothing on disk lost, no path escapes, and one
clear `error:` line instead of a traceback. Each test reproduces the report and checks the
refusal comes before any work (the model is never loaded where that is promised), and that
the user's files are untouched. docs/RELIABILITY.md, section 10, lists them with their messages.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import write_jsonl
from faults import ROWS, data_file, one_thread, quick_train, step_hook  # noqa: F401
from tunelab.config import ConfigError, GenerationConfig, ModelConfig
from tunelab.runs import LOCK_FILE, DiskFull, NotWritable, RunDir, RunLocked

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def finished(tiny_qwen, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("edges")
    return quick_train(tiny_qwen, data_file(root), root / "run", max_steps=2, save_every=2)


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def no_model_load(monkeypatch) -> None:
    """Fail the test if a model is loaded (a refusal must come first)."""
    import tunelab.models
    import tunelab.train

    for module in (tunelab.models, tunelab.train):  # train.py imports it at its top
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the refusal"))


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run `tunelab ARGV` in-process: (exit code, stderr)."""
    from tunelab.cli import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    return exited.value.code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- merge --out: only an earlier export is replaced ------------------------------------------

def test_merge_refuses_a_directory_that_is_not_an_export(finished, tmp_path, monkeypatch, capsys):
    """The report: `mkdir victim; echo x > victim/notes.txt; tunelab merge RUN --out victim`
    exited 0 and notes.txt was gone."""
    from tunelab.merge import EXPORT_INFO, merge

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("x")
    with monkeypatch.context() as patch:
        no_model_load(patch)
        code, err = cli(["merge", str(finished), "--out", str(victim)], capsys)
    assert code == 2 and "not a tunelab export" in one_error_line(err) and "--overwrite true" in err
    assert tree(victim) == {"notes.txt": b"x"}

    merge(str(finished), str(victim), overwrite=True)  # asked for: replaced, marked as an export
    assert (victim / EXPORT_INFO).is_file() and not (victim / "notes.txt").exists()
    (victim / "extra.txt").write_text("y")
    merge(str(finished), str(victim))  # an earlier export: replaced without asking
    assert (victim / EXPORT_INFO).is_file() and not (victim / "extra.txt").exists()


def test_merge_never_writes_over_the_run_or_its_base(finished, tiny_qwen, tmp_path, monkeypatch):
    from tunelab.merge import merge

    no_model_load(monkeypatch)
    before_run, before_base = tree(finished), tree(tiny_qwen)
    targets = {"the run": finished, "the run's parent": finished.parent, "its adapter": finished / "adapter",
               "the base": tiny_qwen, "inside the base": tiny_qwen / "merged"}
    for what, out in targets.items():
        with pytest.raises(ConfigError, match=r"--out .*(the run|base model)") as raised:
            merge(str(finished), str(out), overwrite=True)
        assert "Choose another --out" in str(raised.value), what
    assert tree(finished) == before_run and tree(tiny_qwen) == before_base


# -- train --out: a foreign directory, and a second process ------------------------------------

def test_train_refuses_a_directory_that_is_not_a_run_before_touching_it(tiny_qwen, tmp_path, monkeypatch, capsys):
    out = tmp_path / "mine"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "weights.safetensors").write_bytes(b"user data")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    (out / "config.yaml").write_text("learning_rate: 3\n")  # someone else's config
    before = tree(out)
    no_model_load(monkeypatch)
    code, err = cli(["train", "--model.path", str(tiny_qwen), "--data.path", str(data_file(tmp_path)),
                     "--out", str(out)], capsys)
    assert code == 2 and "is not a tunelab run" in one_error_line(err) and "adapter" in err
    assert tree(out) == before


HOLD = """
import sys, time
from tunelab.runs import RunDir
lock = RunDir(sys.argv[1]).claim()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_train_on_the_same_out_refuses_while_the_first_lives(tiny_qwen, tmp_path, monkeypatch):
    """A live holder (another process) is refused; once it is killed -9 its lock is taken
    over; and a training run holds the lock for as long as it trains."""
    data, out = data_file(tmp_path), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=rf"is being trained by process {holder.pid}.*another --out"):
            quick_train(tiny_qwen, data, out, max_steps=2)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing else touched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    seen = []
    hook = step_hook(monkeypatch)

    def second_train(step):  # what a second `tunelab train --out RUN` meets mid-run
        with pytest.raises(RunLocked, match=f"process {os.getpid()}"):
            RunDir(out).claim()
        seen.append(step)
    hook["on_step"] = second_train
    quick_train(tiny_qwen, data, out, max_steps=2)  # the killed holder's lock is taken over
    assert seen == [0, 1] and RunDir(out).done.is_file()
    RunDir(out).claim().release()  # released when the run ends


# -- experiment: labels are plain names; files are checked --------------------------------------

@pytest.mark.parametrize("label", ["../../../x.txt", "/tmp/abs", "a/b", "..", ".hidden", ""])
def test_experiment_labels_must_be_plain_names(tiny_qwen, tmp_path, monkeypatch, label):
    import tunelab.train
    from tunelab.experiment import experiment

    monkeypatch.setattr(tunelab.train, "train", lambda *a, **k: pytest.fail("trained before the check"))
    spec = {"model": {"path": str(tiny_qwen)}, "data": {"path": str(data_file(tmp_path))},
            "methods": [{"name": "lora"}, {"name": "lora", "label": label}], "out": str(tmp_path / "exp")}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=r"methods\[1\]: `label` must be a plain name"):
        experiment(str(tmp_path / "exp.yaml"))
    assert not (tmp_path / "exp").exists()


def test_link_labels_never_deletes_a_real_file(tmp_path):
    from tunelab.experiment import link_labels

    (tmp_path / "runs" / "lora-1234").mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "lora").write_text("mine")
    with pytest.raises(ConfigError, match="not a link tunelab made"):
        link_labels(tmp_path, {"lora": tmp_path / "runs" / "lora-1234"})
    assert (tmp_path / "models" / "lora").read_text() == "mine"
    (tmp_path / "models" / "lora").unlink()
    link_labels(tmp_path, {"lora": tmp_path / "runs" / "lora-1234"})
    link_labels(tmp_path, {"lora": tmp_path / "runs" / "lora-1234"})  # its own link is replaced
    assert (tmp_path / "models" / "lora").resolve() == (tmp_path / "runs" / "lora-1234").resolve()


@pytest.mark.parametrize("text, message", [
    ("name: demo\nmethods: [{name: lora}\n", r"exp.yaml:3:1: not valid YAML"),
    ("- name: lora\n- name: ptuning\n", r"is a mapping .* holds a list"),
    ("just some words\n", r"is a mapping .* holds a str"),
    ("name: demo\nmethods: lora\n", r"`methods` must be a list of mappings"),
    ("name: demo\nmodel: smollm2\nmethods: [{name: lora}]\n", r"`model` must be a mapping"),
], ids=["syntax error", "a list", "a plain string", "methods not a list", "model not a mapping"])
def test_experiment_file_errors_are_one_line(tmp_path, capsys, text, message):
    import re

    (tmp_path / "exp.yaml").write_text(text)
    code, err = cli(["experiment", str(tmp_path / "exp.yaml")], capsys)
    assert code == 2 and re.search(message, one_error_line(err)), err


# -- flags: checked at the field, before a model loads or a run directory is made ---------------

@pytest.mark.parametrize("flag, value", [
    ("--method.name", "lorax"), ("--train.log_every", "0"), ("--train.save_every", "-1"),
    ("--train.eval_every", "-1"), ("--train.weight_decay", "-0.1"), ("--train.seed", "-1"),
    ("--train.max_grad_norm", "-1"), ("--train.warmup_ratio", "1"), ("--data.seed", "-1"), ("--data.val_size", "2.5"),
    ("--method.lora.alpha", "0"), ("--model.device", "cuda:x"),
])
def test_bad_flags_are_refused_before_any_work(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    code, err = cli(["train", "--model.path", str(tmp_path / "no-model"), "--data.path", str(tmp_path / "no.jsonl"),
                     "--out", str(out), flag, value], capsys)
    assert code == 2 and f"`{flag}` must be" in one_error_line(err), err
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--gen.top_p", "0"), ("--gen.max_new_tokens", "0"),
                                         ("--gen.temperature", "-1"), ("--gen.seed", "-2")])
def test_bad_generation_flags_name_the_flag(tmp_path, capsys, flag, value):
    code, err = cli(["chat", "--model.path", str(tmp_path), flag, value], capsys)
    assert code == 2 and f"`{flag}` must be" in one_error_line(err), err


def test_a_parse_error_comes_first_in_one_line(capsys):
    code, err = cli(["train", "--train.log_every", "often"], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and lines[0].startswith("error:") and "train.log_every" in lines[0] and len(lines) <= 2, err
    assert "--help" in lines[-1]


# -- model directories ----------------------------------------------------------------------------

def broken_models(tiny_qwen: Path, root: Path) -> dict[str, tuple[Path, str]]:
    """name -> (model directory, what the error must say)."""
    empty = root / "empty"
    empty.mkdir(parents=True)
    no_config = shutil.copytree(tiny_qwen, root / "no-config")
    (no_config / "config.json").unlink()
    truncated = shutil.copytree(tiny_qwen, root / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    remote = shutil.copytree(tiny_qwen, root / "remote-code")
    config = json.loads((remote / "config.json").read_text())
    config.update(model_type="mystery_lm", auto_map={"AutoConfig": "configuration_mystery.MysteryConfig",
                                                     "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM"})
    (remote / "config.json").write_text(json.dumps(config))
    no_weights = shutil.copytree(tiny_qwen, root / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    return {"empty": (empty, "is empty"), "no config.json": (no_config, "has no config.json"),
            "truncated": (truncated, "model.safetensors cannot be read"),
            "auto_map": (remote, "--model.trust_remote_code true"),
            "no weights": (no_weights, "holds no weights")}


def test_broken_model_directories_are_one_clear_line(tiny_qwen, tmp_path, capsys):
    data = data_file(tmp_path)
    for name, (model, says) in broken_models(tiny_qwen, tmp_path / "models").items():
        code, err = cli(["train", "--model.path", str(model), "--data.path", str(data),
                         "--out", str(tmp_path / f"run-{name}")], capsys)
        line = one_error_line(err)
        assert code == 2 and says in line and str(model) in line, (name, err)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_one_clear_line(tiny_qwen, tmp_path, capsys, monkeypatch):
    no_model_load(monkeypatch)
    code, err = cli(["train", "--model.path", str(tiny_qwen), "--data.path", str(data_file(tmp_path)),
                     "--out", str(tmp_path / "run"), "--model.device", "cuda"], capsys)
    assert code == 2 and "`--model.device cuda`: this machine has no CUDA device" in one_error_line(err)
    assert not RunDir(tmp_path / "run").config.exists()


# -- disk full as torch reports it; read-only output folders ---------------------------------------

def test_disk_full_inside_torch_save_is_the_disk_full_message(tiny_qwen, tmp_path, monkeypatch):
    """torch.save's zip writer reports a full disk as a RuntimeError with no errno."""
    data, calls = data_file(tmp_path), {"n": 0}
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"\0" * 100)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(DiskFull) as raised:
        quick_train(tiny_qwen, data, tmp_path / "run", max_steps=4, save_every=2)
    assert str(raised.value).startswith("the disk is full") and "step-0000004" in str(raised.value)
    assert [p.name for p in RunDir(tmp_path / "run").checkpoints.iterdir()] == ["step-0000002"]


def read_only(monkeypatch, folder: Path) -> None:
    """Make `folder` read-only; as root (who writes anyway) also deny it through os.access."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == folder else real(p, mode, *a, **k))


def test_merge_and_eval_check_the_output_folder_first(finished, tmp_path, monkeypatch, capsys):
    import tunelab.generate

    locked = tmp_path / "locked"
    read_only(monkeypatch, locked)
    try:
        no_model_load(monkeypatch)
        monkeypatch.setattr(tunelab.generate.Engine, "from_runs",
                            classmethod(lambda *a, **k: pytest.fail("models loaded before the check")))
        for argv in (["merge", str(finished), "--out", str(locked / "merged")],
                     ["eval", "--runs", f"[{finished}]", "--out", str(locked / "report")]):
            code, err = cli(argv, capsys)
            assert code == 2 and f"--out {locked}" in one_error_line(err) and "cannot be written" in err, argv
    finally:
        locked.chmod(0o755)


# -- a run whose base model moved -------------------------------------------------------------

def test_a_moved_base_is_named_and_can_be_pointed_at(tiny_qwen, tmp_path, capsys):
    from tunelab.chat import chat
    from tunelab.evaluate.runner import evaluate
    from tunelab.merge import merge

    base = shutil.copytree(tiny_qwen, tmp_path / "base")
    run = quick_train(base, data_file(tmp_path), tmp_path / "run", max_steps=1, save_every=0)
    moved = base.rename(tmp_path / "moved")
    for argv in (["chat", "--run", str(run), "--prompt", "hi"], ["merge", str(run)],
                 ["eval", "--runs", f"[{run}]", "--suites", "[general]"]):
        code, err = cli(argv, capsys)
        line = one_error_line(err)
        assert code == 2 and f"{base} does not exist" in line and str(RunDir(run).config) in line, argv
        assert "--model.path" in line
    point = ModelConfig(path=str(moved))
    gen = GenerationConfig(max_new_tokens=2)
    chat(run=str(run), model=point, prompt="hi", gen=gen)
    assert merge(str(run), model=point).is_dir()
    report = evaluate(runs=[str(run)], model=point, suites=["general"], gen=gen, limit=1, out=str(tmp_path / "ev"))
    assert "general" in report["suites"]
    with pytest.raises(Exception, match="another base model"):  # another model is still refused
        merge(str(run), out=str(tmp_path / "other"), model=ModelConfig(path=str(wider_model(tmp_path))))


def wider_model(root: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from conftest import build_tokenizer

    directory, tok = root / "wider", build_tokenizer()
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


# -- quieter failures ---------------------------------------------------------------------------

def test_train_says_how_many_rows_were_skipped_cut_or_dropped(tiny_qwen, tmp_path, capsys):
    from tunelab.config import DataConfig, TrainConfig
    from tunelab.methods import MethodConfig
    from tunelab.train import train

    rows = ROWS[:8] + [{"instruction": "no answer", "input": ""}, {"instruction": "long " * 300, "input": "",
                                                                   "output": "fine."}]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    train(ModelConfig(path=str(tiny_qwen)), DataConfig(path=str(path), on_error="skip", truncation="drop",
                                                       max_length=256),
          MethodConfig(), TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, save_every=0),
          out=str(tmp_path / "run"))
    out = capsys.readouterr().out
    assert "10 records, 8 train rows" in out
    assert "skipped 1 bad records (--data.on_error skip: 1 missing field)" in out
    assert "dropped 1 rows longer than --data.max_length 256" in out


class FakeEngine:
    """What fit_context reads of an Engine: a context length and a token count per message."""

    def __init__(self, context: int):
        self.base = type("Base", (), {"config": type("Config", (), {"max_position_embeddings": context})()})()
        self.format = type("Format", (), {"prompt_ids": staticmethod(
            lambda messages: [0] * sum(len(m["content"]) for m in messages))})()


def test_chat_drops_old_turns_to_fit_and_refuses_a_message_that_cannot(capsys):
    from tunelab.chat import fit_context

    history = [{"role": "user", "content": "a" * 30}, {"role": "assistant", "content": "b" * 30},
               {"role": "user", "content": "c" * 10}, {"role": "assistant", "content": "d" * 10}]
    messages = fit_context(FakeEngine(100), None, history, "e" * 20, max_new_tokens=40)
    assert [m["content"][0] for m in messages] == ["c", "d", "e"] and len(history) == 2
    assert "dropped the 1 oldest exchange" in capsys.readouterr().err
    assert fit_context(FakeEngine(100), None, [], "f" * 70, max_new_tokens=40) is None
    assert "over the model's context of 100 tokens" in capsys.readouterr().err


def test_chat_prompt_longer_than_the_context_is_one_clear_line(tiny_qwen, capsys):
    code, err = cli(["chat", "--model.path", str(tiny_qwen), "--prompt", "hello " * 600], capsys)
    assert code == 2 and "does not fit the model's context" in one_error_line(err)
    assert "over the model's context of 512 tokens" in err

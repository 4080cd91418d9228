"""Terminal chat with a run (adapter on its base) or any model.

Streams tokens, keeps history, renders through the same chat template as training and
stops at the template's end of turn. Commands: /reset, /system TEXT, /quit.
"""

from __future__ import annotations

import sys
from typing import Optional

from .config import ConfigError, GenerationConfig, ModelConfig
from .runs import load_run

HELP = "commands: /reset (forget the history), /system TEXT (set the system prompt), /quit"


def open_engine(run: Optional[str], model: Optional[ModelConfig], no_adapter: bool = False) -> tuple[Engine, dict]:
    """An Engine for a run directory (its adapter unless no_adapter) or for a plain model.
    With both, `model.path` points the run at its base where that was moved."""
    from .generate import Engine  # torch at its top: imported here so `tunelab --help` stays fast (tests/test_cli.py)
    from .models import load_model, load_tokenizer

    if run:
        net, tokenizer, config = load_run(run, adapter=not no_adapter, base=model)
        return Engine(net, tokenizer), config
    if model is None or not model.path:
        raise ConfigError("give a run (--run RUN) or a model (--model.path PATH)")
    return Engine(load_model(model), load_tokenizer(model)), {}


def chat(run: Optional[str] = None, model: Optional[ModelConfig] = None, no_adapter: bool = False,
         system: Optional[str] = None, gen: GenerationConfig = GenerationConfig(),
         prompt: Optional[str] = None) -> None:
    """Chat in the terminal.

    Args:
        run: a run directory: its base model with its adapter.
        model: any model instead of a run (a directory, .gguf file or hub id); with --run, where
            the run's base model is now if it was moved (`--model.path NEW_DIR`, checked to be
            the same model).
        no_adapter: with --run, chat with the base model alone.
        system: the system prompt (default: the run's `data.system_prompt`).
        gen: decoding options (greedy by default).
        prompt: answer this one message and exit (no interactive loop).
    """
    engine, config = open_engine(run, model, no_adapter)
    if system is None:
        system = (config.get("data") or {}).get("system_prompt")
    history: list[dict] = []

    def ask(text: str) -> str | None:
        messages = fit_context(engine, system, history, text, gen.max_new_tokens)
        if messages is None:
            return None
        pieces = []
        for piece in engine.stream(messages, gen):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        answer = "".join(pieces).strip()
        history.extend([{"role": "user", "content": text}, {"role": "assistant", "content": answer}])
        return answer

    if prompt is not None:
        if ask(prompt) is None:
            raise ConfigError("the --prompt message does not fit the model's context (above); shorten it "
                              "or lower --gen.max_new_tokens")
        return
    print(f"tunelab chat ({run or model.path}{', no adapter' if no_adapter else ''}). {HELP}")
    while True:
        try:
            text = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history.clear()
            print("(history cleared)")
        elif text.startswith("/system"):
            system = text[len("/system"):].strip() or None
            history.clear()
            print(f"(system prompt: {system!r}; history cleared)")
        elif text.startswith("/"):
            print(HELP)
        else:
            ask(text)


def context_length(engine) -> int | None:
    """Positions the model can attend over (config.max_position_embeddings), if it says."""
    config = getattr(engine.base, "config", None)
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def fit_context(engine, system: Optional[str], history: list[dict], text: str, max_new_tokens: int):
    """The messages to send, dropping the oldest turns of `history` (in place) until the prompt
    and the answer fit the model's context; None, with the reason printed, when the new message
    alone does not fit (the model would otherwise run past the positions it was trained on)."""
    limit = context_length(engine)
    head = [{"role": "system", "content": system}] if system else []
    turn = [{"role": "user", "content": text}]
    if not limit:
        return head + history + turn
    dropped = 0
    while True:
        messages = head + history + turn
        needed = len(engine.format.prompt_ids(messages)) + max_new_tokens
        if needed <= limit:
            break
        if not history:
            alone = needed - max_new_tokens
            print(f"(not sent: this message needs {alone:,} prompt tokens + --gen.max_new_tokens "
                  f"{max_new_tokens} = {needed:,}, over the model's context of {limit:,} tokens; "
                  f"shorten it or lower --gen.max_new_tokens)", file=sys.stderr)
            return None
        del history[:2]  # the oldest user turn and its answer
        dropped += 1
    if dropped:
        print(f"(dropped the {dropped} oldest exchange{'s' if dropped > 1 else ''} of the history to fit the "
              f"model's context of {limit:,} tokens; /reset clears it all)", file=sys.stderr)
    return messages

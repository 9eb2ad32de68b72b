"""`llmc chat`: a conversation in the terminal with a served model (OpenAI API) or a local checkpoint.

One user line is one turn; the history is sent every turn, so the model sees the whole conversation.
`/reset` starts over, `/exit` (or end of input) quits. Lines come from stdin, so a file or a pipe works
as well as a terminal (`llmc chat --model-dir runs/x/merged < questions.txt`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

Reply = Callable[[list[dict]], Iterator[str]]  # the history so far -> the reply, in pieces as they come
COMMANDS_HELP = "/reset starts a new conversation, /exit quits"


def served_model(url: str, model: str | None, api_key: str | None, max_tokens: int,
                 temperature: float) -> tuple[Reply, str]:
    """Replies streamed from an OpenAI-compatible endpoint (`llmc serve`, vLLM, any other), and the model's
    name: `model`, or the first one the endpoint lists."""
    import openai

    client = openai.OpenAI(base_url=url, api_key=api_key or "none", max_retries=0, timeout=300)
    model = model or client.models.list().data[0].id

    def reply(history: list[dict]) -> Iterator[str]:
        stream = client.chat.completions.create(model=model, messages=history, max_tokens=max_tokens,
                                                temperature=temperature, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content

    return reply, model


def local_model(model_dir: str, adapter: str | None, max_tokens: int, temperature: float) -> Reply:
    """Replies from a model directory (and a PEFT adapter on it) with transformers, on this machine's CPU or GPU."""
    import torch

    from workloads.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()

    def reply(history: list[dict]) -> Iterator[str]:
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        batch = tokenizer([text], return_tensors="pt", add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
        yield tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return reply


def converse(reply: Reply, lines: TextIO = sys.stdin, out: TextIO = sys.stdout, system: str | None = None) -> int:
    """Read user turns from `lines` until /exit or end of input; print each reply as it streams. Returns turns."""
    start = [{"role": "system", "content": system}] if system else []
    history, turns = list(start), 0
    prompt = "you> " if lines.isatty() else ""
    while True:
        if prompt:
            print(prompt, end="", file=out, flush=True)
        line = lines.readline()
        if not line or line.strip() == "/exit":
            return turns
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(start)
            print("[llmc] new conversation", file=out, flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", file=out, flush=True)
        pieces = []
        for piece in reply(history):
            pieces.append(piece)
            print(piece, end="", file=out, flush=True)
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
        turns += 1


def api_key_from(env_name: str | None) -> str | None:
    """The key in environment variable `env_name` (never on the command line, where `ps` shows it)."""
    return os.environ.get(env_name) if env_name else None


def checked_dir(path: str, field: str, marker: str) -> str:
    """`path` if it is a directory holding `marker`, else a RecipeError naming the option."""
    from workloads.common.recipe import RecipeError

    if not (Path(path) / marker).is_file():
        raise RecipeError(f"field '{field}': {path} has no {marker}")
    return path

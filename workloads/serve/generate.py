"""`llmc generate RECIPE --input prompts.jsonl --output out.jsonl`: offline batch generation with vLLM.

For evaluation sets and RL rollouts: one in-process `vllm.LLM` (its engine runs in a child process,
so call this from a `__main__` entry point such as the CLI), every row submitted at once so the
engine batches them continuously. Rows are `{"prompt": ...}` or `{"messages": [...]}` and may set
`max_tokens`, `temperature`, `top_p`, `n`, `stop`, `seed` and `adapter` (a name from the recipe's
`adapters.paths` or a PEFT directory); the recipe's `generate` block gives the defaults.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from workloads.common.paths import resolve_path
from workloads.common.recipe import RecipeError
from workloads.serve.plan import serve_engine_env, serve_engine_kwargs
from workloads.serve.recipe import ServeRecipe

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "n", "stop", "seed")


def read_rows(path: Path) -> list[dict]:
    """Prompt rows from JSONL; each must hold a string `prompt` or a list `messages`."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"{path}:{number}: not valid JSON: {exc}") from None
        usable = isinstance(row, dict) and (isinstance(row.get("prompt"), str) or isinstance(row.get("messages"), list))
        if not usable:
            raise RecipeError(f"{path}:{number}: a row needs a string 'prompt' or a list 'messages'")
        rows.append(row)
    if not rows:
        raise RecipeError(f"{path}: no prompt rows")
    return rows


def adapter_dir(recipe: ServeRecipe, name_or_path: str) -> Path:
    """A recipe adapter name, or a directory holding a PEFT adapter."""
    found = resolve_path(recipe.adapters.paths.get(name_or_path, name_or_path))
    if found is None or not (found / "adapter_config.json").is_file():
        raise RecipeError(f"adapter {name_or_path!r}: not a name in adapters.paths nor a PEFT adapter directory")
    return found


def engine(recipe: ServeRecipe, model_path: str | None = None):
    """The in-process vLLM engine the recipe describes (same engine arguments as `llmc serve`); `model_path`: the
    resolved `model.name`, when the caller has it."""
    from vllm import LLM

    from workloads.models.loading import resolve_model_path

    os.environ.update(serve_engine_env(recipe))
    return LLM(model=model_path or resolve_model_path(recipe.model), **serve_engine_kwargs(recipe))


def run(recipe: ServeRecipe, input_path: Path, output_path: Path, adapter: str | None = None, llm=None) -> dict:
    """Generate for every row, write one output row per input row, return (and print) a summary."""
    rows = read_rows(input_path)
    names = {row.get("adapter", adapter) for row in rows} - {None}
    dirs = {name: adapter_dir(recipe, name) for name in sorted(names)}
    if dirs and not recipe.adapters.enabled:
        raise RecipeError("field 'adapters.enabled': rows ask for adapters but adapters are disabled")
    llm = llm or engine(recipe)
    prompts, params, loras = _requests(recipe, llm, rows, adapter, dirs)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, lora_request=loras if dirs else None, use_tqdm=False)
    seconds = time.perf_counter() - start
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    completion_tokens = 0
    with output_path.open("w") as out:
        for row, result in zip(rows, outputs, strict=True):
            tokens = sum(len(c.token_ids) for c in result.outputs)
            completion_tokens += tokens
            texts = [c.text for c in result.outputs]
            out.write(json.dumps({**row, "completion": texts[0], "completions": texts,
                                  "finish_reasons": [c.finish_reason for c in result.outputs],
                                  "prompt_tokens": len(result.prompt_token_ids or []),
                                  "completion_tokens": tokens}) + "\n")
    summary = {"rows": len(rows), "completion_tokens": completion_tokens, "seconds": round(seconds, 3),
               "tokens_per_s": round(completion_tokens / max(seconds, 1e-9), 1), "output": str(output_path)}
    print(f"[llmc] generate: {json.dumps(summary)}", flush=True)
    return summary


def _requests(recipe: ServeRecipe, llm, rows: list[dict], adapter: str | None, dirs: dict[str, Path]):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    tokenizer = llm.get_tokenizer()
    # Integer ids must be unique per adapter for the engine's LoRA cache.
    lora_requests = {name: LoRARequest(name, index + 1, str(path)) for index, (name, path) in enumerate(dirs.items())}
    defaults = recipe.generate.model_dump()
    prompts, params, loras = [], [], []
    for row in rows:
        if "prompt" in row:
            prompts.append(row["prompt"])
        else:
            prompts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True))
        sampling = {k: row.get(k, defaults[k]) for k in SAMPLING_FIELDS}
        params.append(SamplingParams(**sampling))
        name = row.get("adapter", adapter)
        loras.append(lora_requests[name] if name else None)
    return prompts, params, loras

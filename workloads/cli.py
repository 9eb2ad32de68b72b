"""`llmc <command> RECIPE [--set key=value ...] [--address ...]`: one CLI over every workload.

Every command that takes a recipe validates it first: a broken recipe exits 2 with each bad
field, its value and what is allowed, before Ray or any model is touched.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from workloads.common.entrypoint import finetune_arguments, output_options, recipe_arguments, run_entrypoint
from workloads.kinds import KINDS, load_recipe
from workloads.models.recipe import ModelConfig

STOPPING = ("Ctrl-C or SIGTERM (docker stop, systemd, Kubernetes) stops a command cleanly: a serving app is deleted, "
            "a training run aborted (its checkpoints kept), an embedded Ray shut down with every process it started. "
            "Work that did not finish exits 130 (Ctrl-C) or 143 (SIGTERM); `llmc serve` runs until stopped, so it "
            "exits 0.")


def _cmd_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    report = {"recipe": args.recipe, "kind": recipe.kind, "valid": True}
    report.update(KINDS[recipe.kind].plan(recipe))  # resources, batch math, data rows: per kind (workloads.kinds)
    if args.print:  # the recipe as it will run: every default filled in, overrides applied, secrets masked
        import yaml

        print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False), end="")
        return 0
    print(json.dumps(report, indent=2))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from workloads.common.recipe import RecipeError
    from workloads.models.lora import merge_adapter

    config = Path(args.adapter) / "adapter_config.json"
    if not config.is_file():
        raise RecipeError(f"field 'adapter': {args.adapter} is not a PEFT adapter directory (no adapter_config.json)")
    base = args.base or json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise RecipeError("field '--base': the adapter does not name its base model: pass --base MODEL")
    model, recipe = _merge_model(args, base)
    out = merge_adapter(base, args.adapter, args.output, model)
    print(f"[llmc] merged {args.adapter} into {base}" + (f" at revision {model.revision}" if model.revision else "")
          + (f" (model.revision, model.chat_template and model.dtype of {recipe})" if recipe else "") + f" -> {out}")
    return 0


def _merge_model(args: argparse.Namespace, base: str) -> tuple[ModelConfig, Path | None]:
    """The `model` section `llmc merge` merges as (revision, chat template, dtype): `--recipe`'s, else that of the
    recipe the run saved beside the adapter (`<run dir>/recipe.yaml`), else the schema's defaults; `--dtype` wins.
    Returns it with the recipe it came from (None: none)."""
    import yaml
    from pydantic import ValidationError

    from workloads.common.recipe import RecipeError

    recipe = Path(args.recipe) if args.recipe else Path(args.adapter).resolve().parent / "recipe.yaml"
    if args.recipe and not recipe.is_file():
        raise RecipeError(f"field '--recipe': {args.recipe} is not a file")
    fields = (yaml.safe_load(recipe.read_text()) or {}).get("model", {}) if recipe.is_file() else {}
    try:
        model = ModelConfig.model_validate({**fields, "name": base, **({"dtype": args.dtype} if args.dtype else {})})
    except ValidationError as exc:
        raise RecipeError(f"field '--recipe': the model section of {recipe} is not valid: {exc}") from None
    return model, (recipe if fields else None)


def _cmd_finetune(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="finetune")
    KINDS["finetune"].run(recipe, output_dir=args.output_dir, address=args.address, overwrite=args.overwrite)
    return 0


def _cmd_align(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="align")
    KINDS["align"].run(recipe, output_dir=args.output_dir, address=args.address, overwrite=args.overwrite)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="serve")
    try:
        KINDS["serve"].runner(recipe, address=args.address, port=args.port)
    except KeyboardInterrupt:  # serving runs until stopped: Ctrl-C or SIGTERM is its normal end (the app deleted)
        print("[llmc] stopped", file=sys.stderr, flush=True)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="serve")
    from workloads.serve.generate import run

    run(recipe, Path(args.input), Path(args.output), adapter=args.adapter)
    return 0


def _results_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE, `--set`, `--address` and the results directory: eval, optimize and search."""
    recipe_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="results directory")


def _run_recipe(command_name: str) -> Callable[[argparse.Namespace], int]:
    """A command that checks a recipe of one of the kinds `command_name` runs (workloads.kinds), then hands it to that
    kind's runner (imported only then: a bad recipe fails before the heavy imports)."""
    kinds = tuple(name for name, kind in KINDS.items() if kind.command == command_name)

    def command(args: argparse.Namespace) -> int:
        recipe = load_recipe(args.recipe, args.overrides, kind=kinds)
        KINDS[recipe.kind].run(recipe, output_dir=args.output_dir, address=args.address)
        return 0

    return command


def _cmd_pipeline(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="pipeline")
    from workloads.pipeline.run import check_start

    check_start(recipe, args.start_from, args.address)  # a bad --from exits 2 before any work, as a bad recipe does
    KINDS["pipeline"].run(recipe, output_dir=args.output_dir, address=args.address, start_from=args.start_from)
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from workloads.serve.promote import promote

    promote(args.ref, address=args.address, url=args.url, tracking_uri=args.tracking_uri)
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    from workloads.serve.promote import rollback

    rollback(args.model, address=args.address, tracking_uri=args.tracking_uri)
    return 0


def _promotion_arguments(p: argparse.ArgumentParser, target: str, help_text: str) -> None:
    p.add_argument(target, help=help_text)
    p.add_argument("--address", default=None, help="the Ray cluster serving the endpoint (default: RAY_ADDRESS)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow store of the registry (default: the one the endpoint was started with)")


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from workloads.models.recipe import TinyModelConfig
    from workloads.models.tiny import build_tiny_model

    print(build_tiny_model(TinyModelConfig(), out_dir=Path(args.dir) if args.dir else None))
    return 0


def _cmd_make_model(args: argparse.Namespace) -> int:
    from workloads.models.loading import resolve_model_path
    from workloads.models.recipe import ModelConfig

    is_file = Path(args.model).expanduser().is_file()
    cfg = ModelConfig(gguf=args.model) if is_file else ModelConfig(name=args.model)
    print(resolve_model_path(cfg))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    command = [a for a in args.command if a != "--"]
    if not command or command[0] not in COMMANDS or command[0] == "submit":
        raise SystemExit(f"llmc submit: expected `-- <llmc command> ...`, got {command!r}")
    sub = build_parser().parse_args(command)
    from workloads.common.submission import (
        SECRET_EXCLUDES,
        check_recipe_for_submission,
        files_with_inline_keys,
        forwarded_env,
    )

    names = list(args.env)
    if getattr(sub, "recipe", None):
        recipe = load_recipe(sub.recipe, sub.overrides)  # fail here, not on the cluster
        check_recipe_for_submission(sub.recipe, sub.overrides)
        names += getattr(getattr(recipe, "run", None), "forward_env", [])
    env = forwarded_env(list(dict.fromkeys(names)))
    held_back = files_with_inline_keys(args.working_dir)
    if held_back:
        print(f"[llmc] not uploaded (API keys inline): {', '.join(held_back)}", flush=True)
    if env:
        print(f"[llmc] forwarding environment variables: {', '.join(env)} (values not shown)", flush=True)
    from cluster.jobs import submit

    entrypoint = "python -m workloads.cli " + shlex.join(command)
    job_id, status, _url = submit(entrypoint, address=args.address, working_dir=args.working_dir,
                                  env_vars=env, excludes=SECRET_EXCLUDES + held_back, wait=not args.no_wait,
                                  stop_on_interrupt=args.stop_on_interrupt)
    print(f"[llmc] job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster.status import ClusterUnreachable, collect, render

    try:
        snapshot = collect(args.address)
    except ClusterUnreachable as exc:
        print(f"llmc status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(snapshot, indent=2, default=str))
    else:
        render(snapshot)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from workloads.common.recipe import RecipeError
    from workloads.serve import chat

    if bool(args.url) == bool(args.model_dir):
        raise RecipeError("fields '--url' and '--model-dir': give exactly one (a served endpoint or a local model)")
    if args.url:
        reply, model = chat.served_model(args.url, args.model, chat.api_key_from(args.api_key_env),
                                         args.max_tokens, args.temperature)
        where = f"{model} at {args.url}"
    else:
        if args.model_dir == "tiny":
            from workloads.models.recipe import TinyModelConfig
            from workloads.models.tiny import build_tiny_model

            model_dir = str(build_tiny_model(TinyModelConfig()))
        else:
            model_dir = chat.checked_dir(args.model_dir, "--model-dir", "config.json")
        adapter = chat.checked_dir(args.adapter, "--adapter", "adapter_config.json") if args.adapter else None
        reply = chat.local_model(model_dir, adapter, args.max_tokens, args.temperature)
        where = model_dir + (f" + {adapter}" if adapter else "")
    print(f"[llmc] chatting with {where}; {chat.COMMANDS_HELP}", file=sys.stderr, flush=True)
    chat.converse(reply, system=args.system)
    return 0


def _chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="an OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="with --url: the model or adapter name (default: the first listed)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                   help="with --url: the environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--model-dir", default=None, help="a local model directory (or 'tiny'), run with transformers")
    p.add_argument("--adapter", default=None, help="with --model-dir: a PEFT adapter directory on top of it")
    p.add_argument("--system", default=None, help="a system prompt for every conversation")
    p.add_argument("--max-tokens", type=int, default=128, help="reply length limit (tokens)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")


# name -> (help, argument setup, handler). Add a workload by adding a row.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "validate": (
        "check a recipe and print its resource plan; exit 2 if invalid",
        lambda p: (recipe_arguments(p), p.add_argument("--print", action="store_true",
                                                   help="print the resolved recipe (YAML) instead of the plan")),
        _cmd_validate,
    ),
    "merge": (
        "merge a LoRA adapter into its base model and write a plain model directory",
        lambda p: (
            p.add_argument("adapter", help="PEFT adapter directory (e.g. runs/tiny-lora/adapter)"),
            p.add_argument("--output", required=True, help="directory for the merged model"),
            p.add_argument("--base", default=None, help="base model (default: the one the adapter names)"),
            p.add_argument("--recipe", default=None,
                           help="the run's recipe: its model.revision, chat_template and dtype (default: the "
                                "recipe.yaml the run saved beside the adapter, if there)"),
            p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                           help="weights dtype (default: the recipe's model.dtype)"),
        ),
        _cmd_merge,
    ),
    "finetune": (
        "SFT: full, LoRA or QLoRA on Ray Train workers",
        finetune_arguments,
        _cmd_finetune,
    ),
    "align": (
        "reward model or DPO from preference pairs (TRL on Ray Train workers), or PPO / GRPO on a policy's samples",
        finetune_arguments,
        _cmd_align,
    ),
    "serve": (
        "OpenAI-compatible endpoint (vLLM on Ray Serve) for the model and its LoRA adapters, until Ctrl-C",
        lambda p: (recipe_arguments(p), p.add_argument("--port", type=int, default=None, help="HTTP port")),
        _cmd_serve,
    ),
    "generate": (
        "offline batch generation through the vLLM engine: JSONL prompts in, JSONL completions out",
        lambda p: (
            recipe_arguments(p),
            p.add_argument("--input", required=True, help="JSONL: {prompt} or {messages}, optional sampling fields"),
            p.add_argument("--output", required=True, help="JSONL written here, one row per input row"),
            p.add_argument("--adapter", default=None, help="adapters.paths NAME (or a PEFT dir) for every row"),
        ),
        _cmd_generate,
    ),
    "eval": (
        "score prompt variants on a JSONL test set through an OpenAI-compatible endpoint (ours by default)",
        _results_arguments,
        _run_recipe("eval"),
    ),
    "optimize": (
        "improve a few-shot library prompt: bootstrapped demonstrations and instruction candidates scored on a dev "
        "split; the best saved as its next version",
        _results_arguments,
        _run_recipe("optimize"),
    ),
    "search": (
        "Ray Tune over prompt variants (ASHA on dev cases scored; the winner scored on the test split) or, with kind "
        "hparam_search, over fine-tuning hyperparameters (ASHA on eval loss; the best run's adapter kept)",
        _results_arguments,
        _run_recipe("search"),
    ),
    "pipeline": (
        "run recipes as stages in order (later stages reading earlier ones' outputs, gates on their results); a "
        "rerun skips every stage whose inputs are unchanged; a missed gate exits 1",
        lambda p: (_results_arguments(p),
                   p.add_argument("--from", dest="start_from", default=None, metavar="STAGE",
                                  help="run this stage and every later one even if unchanged")),
        _cmd_pipeline,
    ),
    "promote": (
        "put a registered adapter version behind its stable name on a running endpoint (llmc serve), once the gate's "
        "eval has scored it and the champion through that endpoint: no restart; a candidate that fails exits 1",
        lambda p: (_promotion_arguments(p, "ref", "MODEL@VERSION, a version of a registered model"),
                   p.add_argument("--url", default=None, help="the endpoint's /v1 URL the gate's eval calls "
                                  "(default: the URL it was started with)")),
        _cmd_promote,
    ),
    "rollback": (
        "put the previous champion of a registered model back behind its stable name on a running endpoint",
        lambda p: _promotion_arguments(p, "model", "MODEL, a registered model"),
        _cmd_rollback,
    ),
    "chat": (
        "talk to a served model (--url) or a local checkpoint (--model-dir) in the terminal; /reset, /exit",
        _chat_arguments,
        _cmd_chat,
    ),
    "make-tiny-model": (
        "build the tiny Llama and tokenizer (cached) and print its directory",
        lambda p: p.add_argument("dir", nargs="?", default=None, help="write here instead of the cache"),
        _cmd_make_tiny_model,
    ),
    "make-model": (
        "build or convert a model once (tiny, smollm2-135m, or a GGUF file's path), cached, and print its directory",
        lambda p: p.add_argument("model", help="tiny | smollm2-135m | PATH.gguf"),
        _cmd_make_model,
    ),
    "submit": (
        "send an llmc command to a running cluster: llmc submit [--address URL] -- finetune RECIPE",
        lambda p: (
            p.add_argument("--address", default=None, help="dashboard URL (default RAY_ADDRESS or :8265)"),
            p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir"),
            p.add_argument("--no-wait", action="store_true", help="return once submitted"),
            p.add_argument("--stop-on-interrupt", action="store_true",
                           help="Ctrl-C while following the job stops it on the cluster (default: it goes on)"),
            p.add_argument("--env", action="append", default=[], metavar="NAME",
                           help="forward this environment variable to the job, e.g. HF_TOKEN (repeatable)"),
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- <llmc command and args>"),
        ),
        _cmd_submit,
    ),
    "status": (
        "what a running cluster does: jobs, train runs (step, loss), serve apps (replicas), the endpoint",
        lambda p: (
            p.add_argument("--address", default=None, help="dashboard URL (default RAY_ADDRESS or :8265)"),
            p.add_argument("--json", action="store_true", help="print JSON for scripts instead of tables"),
        ),
        _cmd_status,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description=__doc__.splitlines()[0], parents=[output_options()],
                                     epilog=STOPPING)
    subparsers = parser.add_subparsers(dest="command_name", required=True)
    for name, (help_text, setup, handler) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, parents=[output_options()],
                                    epilog=STOPPING)
        setup(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_entrypoint(lambda: args.handler(args), verbose=getattr(args, "verbose", False))

if __name__ == "__main__":
    raise SystemExit(main())

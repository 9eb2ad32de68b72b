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

from workloads.config import RecipeError, load_recipe

EXIT_BAD_RECIPE = 2


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="YAML recipe (see workloads/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.learning_rate=3e-4 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")


def _cmd_validate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides)
    report = {"recipe": args.recipe, "kind": recipe.kind, "valid": True}
    if recipe.kind == "finetune":
        from workloads.plan import finetune_plan

        report.update(finetune_plan(recipe))
    if recipe.kind == "serve":
        from workloads.plan import serve_plan

        report.update(serve_plan(recipe))
    print(json.dumps(report, indent=2))
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="finetune")
    from workloads.finetune import run

    run(recipe, output_dir=args.output_dir, address=args.address)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="serve")
    from workloads.serve import run

    run(recipe, address=args.address, port=args.port)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, args.overrides, kind="serve")
    from workloads.generate import run

    run(recipe, Path(args.input), Path(args.output), adapter=args.adapter)
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from workloads.config import TinyModelConfig
    from workloads.models import build_tiny_model

    print(build_tiny_model(TinyModelConfig(), out_dir=Path(args.dir) if args.dir else None))
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    command = [a for a in args.command if a != "--"]
    if not command or command[0] not in COMMANDS or command[0] == "submit":
        raise SystemExit(f"llmc submit: expected `-- <llmc command> ...`, got {command!r}")
    sub = build_parser().parse_args(command)
    if getattr(sub, "recipe", None):
        load_recipe(sub.recipe, sub.overrides)  # fail here, not on the cluster
    from cluster.jobs import submit

    entrypoint = "python -m workloads.cli " + shlex.join(command)
    job_id, status, _url = submit(entrypoint, address=args.address, working_dir=args.working_dir,
                                  wait=not args.no_wait)
    print(f"[llmc] job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING", "RUNNING") else 1


# name -> (help, argument setup, handler). Add a workload by adding a row.
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "validate": ("check a recipe and print its resource plan; exit 2 if invalid", _recipe_args, _cmd_validate),
    "finetune": (
        "SFT: full, LoRA or QLoRA on Ray Train workers",
        lambda p: (_recipe_args(p), p.add_argument("--output-dir", default=None, help="run directory")),
        _cmd_finetune,
    ),
    "serve": (
        "OpenAI-compatible endpoint (vLLM on Ray Serve) for the model and its LoRA adapters, until Ctrl-C",
        lambda p: (_recipe_args(p), p.add_argument("--port", type=int, default=None, help="HTTP port")),
        _cmd_serve,
    ),
    "generate": (
        "offline batch generation through the vLLM engine: JSONL prompts in, JSONL completions out",
        lambda p: (
            _recipe_args(p),
            p.add_argument("--input", required=True, help="JSONL: {prompt} or {messages}, optional sampling fields"),
            p.add_argument("--output", required=True, help="JSONL written here, one row per input row"),
            p.add_argument("--adapter", default=None, help="adapters.paths NAME (or a PEFT dir) for every row"),
        ),
        _cmd_generate,
    ),
    "make-tiny-model": (
        "build the tiny Llama and tokenizer (cached) and print its directory",
        lambda p: p.add_argument("dir", nargs="?", default=None, help="write here instead of the cache"),
        _cmd_make_tiny_model,
    ),
    "submit": (
        "send an llmc command to a running cluster: llmc submit [--address URL] -- finetune RECIPE",
        lambda p: (
            p.add_argument("--address", default=None, help="dashboard URL (default RAY_ADDRESS or :8265)"),
            p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir"),
            p.add_argument("--no-wait", action="store_true", help="return once submitted"),
            p.add_argument("command", nargs=argparse.REMAINDER, help="-- <llmc command and args>"),
        ),
        _cmd_submit,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmc", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command_name", required=True)
    for name, (help_text, setup, handler) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        setup(sub)
        sub.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except RecipeError as exc:
        print(f"llmc: invalid recipe\n{exc}", file=sys.stderr)
        return EXIT_BAD_RECIPE


if __name__ == "__main__":
    raise SystemExit(main())

"""What every entry point shares (`llmc`, `python -m workloads.finetune`, the demo): output, errors, stopping.

A recipe error exits 2 with its message; any other error is one line on the terminal with the file holding its
traceback (and Ray's log dir); Ctrl-C or SIGTERM stops the work cleanly and exits 130 or 143 (128 + the signal: it did
not finish), with one line saying what was kept; an embedded Ray is always shut down.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import traceback
from collections.abc import Callable

from cluster.stopping import interrupted_exit_status, stop_on_sigterm, stop_signal
from workloads.common.recipe import RecipeError

EXIT_BAD_RECIPE = 2


def recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE, `--set KEY=VALUE` and `--address`: what every command that runs a recipe takes."""
    parser.add_argument("recipe", help="YAML recipe (see workloads/configs/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set train.learning_rate=3e-4 (repeatable)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or embedded)")


def finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """`llmc finetune`'s and `python -m workloads.finetune`'s arguments."""
    recipe_arguments(parser)
    parser.add_argument("--output-dir", default=None, help="run directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in the run directory or in run.storage_path/run.name")


def output_options() -> argparse.ArgumentParser:
    """`--verbose`, shared by every command (and the demo)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="stream Ray, Serve and vLLM logs to the terminal (also LLMC_LOG_LEVEL=debug)")
    return common


def set_output(verbose: bool) -> None:
    """Default output is ours (stage lines, progress, tables); library chatter goes to log files unless verbose."""
    if verbose:
        os.environ["LLMC_LOG_LEVEL"] = "debug"  # read by cluster.runtime, inherited by jobs and workers
    if os.environ.get("LLMC_LOG_LEVEL", "").lower() in ("debug", "verbose"):
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # its import-time notes (Triton, platform) included
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its loggers' level when imported
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its CPU kernel fallback note, on every import
    # vLLM's import-time notes (Triton) when Ray Serve LLM imports it before vLLM configures its own logging.
    logging.getLogger("vllm").setLevel(logging.ERROR)
    # Per-request INFO lines of the local S3 endpoint (werkzeug) and of client retries (openai, httpx, boto), and
    # matplotlib's font cache note on a fresh HOME, and MLflow's notes on creating its database (alembic's too).
    for name in ("werkzeug", "moto", "openai", "httpx", "botocore", "boto3", "urllib3", "matplotlib", "mlflow",
                 "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not glob.glob("/dev/nvidia[0-9]*"):  # no NVIDIA GPU: what DeepSpeed would pick, without its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # (a device-file check: importing torch costs a second)


def report_failure(exc: BaseException) -> None:
    """One readable error on the terminal; the traceback goes to a file whose path is printed with Ray's logs."""
    logs = sys.modules["cluster.runtime"].log_dir() if "cluster.runtime" in sys.modules else None
    folder = logs if logs and os.path.isdir(logs) else tempfile.gettempdir()
    with tempfile.NamedTemporaryFile("w", prefix="llmc-error-", suffix=".log", dir=folder, delete=False) as handle:
        traceback.print_exception(exc, file=handle)
    print(f"llmc: error: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(f"llmc: traceback in {handle.name}" + (f"; Ray's logs in {logs}" if logs else ""), file=sys.stderr)


def report_interrupt(exc: KeyboardInterrupt, prefix: str = "[llmc]") -> int:
    """The line an interrupted command ends with (the signal, and what the work kept: the exception's notes, added
    on its way out), and the exit status that says it did not finish."""
    kept = "; ".join(getattr(exc, "__notes__", ()))
    print(f"{prefix} interrupted by {stop_signal().name} before it finished" + (f": {kept}" if kept else ""),
          file=sys.stderr, flush=True)
    return interrupted_exit_status()


def run_entrypoint(command: Callable[[], int], verbose: bool = False) -> int:
    """Run a command as an entry point: its exit status, with errors and stops handled as the module says."""
    set_output(verbose)
    stop_on_sigterm()  # Ctrl-C's path; cluster.runtime renews it after ray.init
    try:
        return command()
    except RecipeError as exc:
        print(f"llmc: invalid recipe\n{exc}", file=sys.stderr)
        return EXIT_BAD_RECIPE
    except Exception as exc:  # noqa: BLE001 - the terminal gets the message and where the details are
        if verbose:
            raise
        report_failure(exc)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM taking its path: the work stopped cleanly, unfinished
        return report_interrupt(exc)
    finally:
        if "cluster.runtime" in sys.modules:  # Ray was used: disconnect, and stop an embedded Ray entirely
            sys.modules["cluster.runtime"].shutdown()


def recipe_job(argv: list[str] | None, *, prog: str, description: str, kind: str) -> int:
    """`python -m MODULE RECIPE [--set K=V] [--output-dir DIR] [--overwrite] [--address A]`: load the recipe of
    `kind`, then run it as `llmc` does (recorded) as an entry point (the jobs `llmc submit` starts)."""
    from workloads.kinds import KINDS, load_recipe

    parser = argparse.ArgumentParser(prog=prog, description=description, parents=[output_options()])
    finetune_arguments(parser)
    args = parser.parse_args(argv)

    def command() -> int:
        recipe = load_recipe(args.recipe, args.overrides, kind=kind)
        KINDS[kind].run(recipe, output_dir=args.output_dir, address=args.address, overwrite=args.overwrite)
        return 0

    return run_entrypoint(command, verbose=getattr(args, "verbose", False))

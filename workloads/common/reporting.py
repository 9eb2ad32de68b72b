"""What a run leaves for people: metrics CSV, loss-curve PNG, the resolved recipe, a summary table."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from pydantic import BaseModel

from workloads.common.recipe import dump_recipe


def save_recipe(recipe: BaseModel, run_dir: Path) -> Path:
    """The resolved recipe (every default filled in) beside the run's outputs: it reproduces the run."""
    path = run_dir / "recipe.yaml"
    dump_recipe(recipe, path)
    return path


def progress_line(row: dict, total_steps: int) -> str:
    parts = [f"step {row['step']:>5}/{total_steps}", f"loss {row['loss']:.4f}"]
    if row.get("eval_loss") is not None:
        parts.append(f"eval_loss {row['eval_loss']:.4f}")
    if row.get("eval_perplexity") is not None:
        parts.append(f"eval_ppl {row['eval_perplexity']:.2f}")
    if row.get("eval_exact_match") is not None:
        parts.append(f"eval_exact_match {row['eval_exact_match']:.3f}")
    parts += [f"lr {row['lr']:.2e}", f"grad_norm {row['grad_norm']:.3f}", f"{row['tokens_per_second']:.0f} tok/s"]
    return "[train] " + " | ".join(parts)


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `pct`% of the values at or below it."""
    if not values or not 0 < pct <= 100:
        raise ValueError(f"percentile needs values and 0 < pct <= 100, got {len(values)} values, pct {pct}")
    ordered = sorted(values)
    return ordered[math.ceil(pct / 100 * len(ordered)) - 1]


class TrainProgress:
    """A one-line progress bar in the driver, fed with rank 0's reported rows (step, loss, eval loss and exact
    match, tokens/s), out of the run's resolved step count."""

    def __init__(self, total_steps: int, description: str = "train"):
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, desc=description, unit="step", dynamic_ncols=True, leave=True)
        self._eval: dict[str, float] = {}

    def update(self, row: dict) -> None:
        if "step" not in row:
            return
        self._eval.update({k: row[k] for k in ("eval_loss", "eval_exact_match") if row.get(k) is not None})
        postfix = {"loss": f"{row['loss']:.3f}"} if "loss" in row else {}
        if "eval_loss" in self._eval:
            postfix["eval_loss"] = f"{self._eval['eval_loss']:.3f}"
        if "eval_exact_match" in self._eval:
            postfix["eval_em"] = f"{self._eval['eval_exact_match']:.2f}"
        if "tokens_per_second" in row:
            postfix["tok/s"] = f"{row['tokens_per_second']:.0f}"
        self._bar.n = int(row["step"])  # a restart from a checkpoint moves it back
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()


def write_csv(rows: list[dict], path: Path) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_losses(rows: list[dict], path: Path, title: str) -> Path:
    """Train loss per step and eval loss where measured, on one axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def two_panels():
    """A figure of two side-by-side panels (matplotlib's Agg backend: no display needed): (fig, (left, right))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 2, figsize=(11, 4))


def save_figure(fig, path: Path, title: str | None = None) -> Path:
    """Title (if any), lay out, write `path` as PNG and free the figure."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_summary(title: str, summary: dict, run_dir: Path) -> None:
    """The summary as a table for a person: entries with no value (None, empty) are left to the JSON file."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in summary.items():
        if value is not None and value != [] and value != {}:
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    console = Console()
    console.print(table)
    console.print(f"results in {run_dir}")


def print_rows(title: str, columns: list[str], rows: list[list[str]], footer: str, *, left: int = 1,
               no_wrap: bool = False) -> None:
    """A results table for a person (the first `left` columns text, the rest numbers), then one footer line."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for n, column in enumerate(columns):
        table.add_column(column, justify="left" if n < left else "right", no_wrap=no_wrap and n < left)
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print(footer)

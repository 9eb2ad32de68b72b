"""`llmc search RECIPE` with `kind: hparam_search`: Ray Tune over fine-tuning hyperparameters, ASHA on eval loss.

Every point of the grid (learning rate x LoRA rank x alpha x steps) is a Tune trial that runs the named fine-tuning
recipe exactly as `llmc finetune` does (`finetune.fit`: a Ray Train run on the recipe's workers); each evaluation of
that run reaches Tune, and ASHA, with the training step as its resource, stops the trials whose eval loss trails at a
rung. The best trial that finished is then written from its final checkpoint as a fine-tuning run (adapter, summary).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from workloads.common import reporting
from workloads.common.paths import PATHS_CHECKED
from workloads.finetune.recipe import FinetuneRecipe
from workloads.search.recipe import HparamSearchRecipe, trial_resources

if TYPE_CHECKING:  # cluster.tune imports Ray: the driver imports it when it runs a search
    from cluster.tune import TrialOutcome
    from workloads.finetune.driver import Prepared

RESOURCE = "step"  # ASHA's time attribute: the optimizer step every train report carries


def hparam_trial(config: dict[str, Any], report, *, prepared: Prepared, out: str, metric: str) -> None:
    """One Tune trial: its fine-tuning recipe's Ray Train run, as `llmc finetune` starts it; every evaluation goes to
    Tune from the run itself (with the path of the checkpoint it came with), so ASHA may stop the trial at any."""
    from cluster.tune import train_reporter
    from workloads.finetune import driver as finetune

    del report  # the Train run's reports reach Tune through `train_reporter`, from its controller
    recipe = FinetuneRecipe.model_validate(config["trial"]["recipe"], context=PATHS_CHECKED)
    finetune.fit(recipe, Path(out) / "trials" / recipe.run.name, prepared, callbacks=[train_reporter(metric)])


def run(recipe: HparamSearchRecipe, output_dir: str | Path | None = None, address: str | None = None,
        show: bool = True) -> dict:
    """The search, then the best finished trial written as a fine-tuning run (adapter, summary.json, ...) to
    `<output dir>/best`; writes summary.json, trials.csv and search.png. `show` prints the plan and trials table."""
    from cluster.runtime import connect
    from cluster.train import FitResult, experiment_path
    from cluster.tune import CHECKPOINT_PATH, grid, local_checkpoint, run_search, trials_that_fit
    from workloads.finetune import driver as finetune

    out = recipe.output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("trials", "best"):  # an earlier search's runs are not this one's
        shutil.rmtree(out / stale, ignore_errors=True)
    reporting.save_recipe(recipe, out)
    trials, base = recipe.trials(), recipe.base()
    prepared = finetune.prepare(base, address)  # model and data are every trial's: checked and tokenized once, here
    lengths = {t.name: t.recipe.train.max_steps or prepared.total_steps for t in trials}
    where = connect(address)
    prepared = prepared.shared()  # in the object store once: every trial's workers read that copy
    per_trial = trial_resources(base, recipe.search.driver_cpus)
    concurrent = recipe.search.max_concurrent_trials or trials_that_fit(per_trial)
    asha = recipe.search.scheduler == "asha"
    grace, max_t = recipe.grace_period(), max(lengths.values())
    if show:
        held = ", ".join(f"{v:g} {k}" for k, v in per_trial.items())
        stopping = (f"ASHA on {recipe.metric} from step {grace}, keeping 1/{recipe.search.reduction_factor:g} at each "
                    "rung" if asha else "no early stopping")
        print(f"[llmc] {where}", flush=True)
        print(f"[llmc] {len(trials)} trials of {recipe.finetune} ({held} each), {concurrent} at a time; {stopping}",
              flush=True)
    outcomes = run_search(
        functools.partial(hparam_trial, prepared=prepared, out=str(out), metric=recipe.metric),
        grid({"trial": [{"name": t.name, "label": t.label, "hparams": t.hparams, "total_steps": lengths[t.name],
                         "recipe": t.recipe.model_dump(mode="json")} for t in trials]}),
        name=recipe.name, storage_path=str(out / "tune"), metric=recipe.metric, mode=recipe.mode,
        time_attr=RESOURCE if asha else None, max_t=max_t, grace_period=grace,
        reduction_factor=recipe.search.reduction_factor, max_concurrent_trials=concurrent,
        cpus_per_trial=recipe.search.driver_cpus, trial_length=lambda config: config["trial"]["total_steps"])
    rows = sorted((_trial_row(o, recipe.metric) for o in outcomes), key=lambda r: r["trial"])
    failed = [r for r in rows if r["error"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(rows)} trials failed; first: {failed[0]['error']}")
    finished = [r for r in rows if r[RESOURCE] == r["total_steps"]]
    if not finished:
        raise RuntimeError(f"no trial finished (storage {out / 'tune'})")
    best = (min if recipe.mode == "min" else max)(finished, key=lambda r: r[recipe.metric])
    # Its last report came with its final checkpoint (it carries the exported adapter): written as `llmc finetune`
    # writes a run, from the search's driver (a trial may be stopped by Tune as soon as it has reported).
    last = next(o for o in outcomes if o.config["trial"]["name"] == best["trial"]).last
    best_recipe = next(t.recipe for t in trials if t.name == best["trial"])
    (out / "best").mkdir()
    reporting.save_recipe(best_recipe, out / "best")
    storage = experiment_path(finetune.storage_of(best_recipe, out / "trials" / best["trial"]), best["trial"])
    checkpoint = local_checkpoint(last[CHECKPOINT_PATH], out / "best" / "final_checkpoint")
    run_summary = finetune.write_outputs(best_recipe, out / "best", prepared.model_path,
                                         FitResult(checkpoint, {}, storage), float(last.get("time_total_s", 0.0)),
                                         show=False)
    summary = {"best_trial": best["trial"], "best_config": best["config"], f"best_{recipe.metric}": best[recipe.metric],
               "best_artifact": run_summary["artifact"], "best_run_dir": str(out / "best"), "metric": recipe.metric,
               "mode": recipe.mode, "num_trials": len(rows), "finished": len(finished),
               "stopped_early": sum(r["stopped_early"] for r in rows),
               "rungs": rungs(grace, max_t, recipe.search.reduction_factor) if asha else [],
               "steps_trained": sum(r[RESOURCE] for r in rows), "steps_exhaustive": sum(lengths.values()),
               "trials": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    reporting.write_csv([{k: v for k, v in r.items() if k not in ("config", "curve")} for r in rows],
                        out / "trials.csv")
    plot_trials(rows, out / "search.png", recipe.metric, summary["rungs"])
    if show:
        _print_trials(summary, out)
    return summary


def rungs(grace: int, max_t: int, factor: float) -> list[int]:
    """The steps where ASHA compares trials (Ray's one-bracket ASHA: grace x factor^k up to max_t)."""
    count = int(math.log(max_t / grace) / math.log(factor) + 1) if max_t >= grace else 0
    return [round(grace * factor**k) for k in range(count)]


def _trial_row(outcome: TrialOutcome, metric: str) -> dict:
    trial = outcome.config.get("trial", {})
    curve = [(int(r[RESOURCE]), float(r[metric])) for r in outcome.reports
             if r.get(metric) is not None and r.get(RESOURCE) is not None and not math.isnan(r[metric])]
    return {"trial": trial.get("name", ""), "label": trial.get("label", ""), **trial.get("hparams", {}),
            metric: round(curve[-1][1], 5) if curve else None, RESOURCE: curve[-1][0] if curve else 0,
            "total_steps": trial.get("total_steps"), "stopped_early": outcome.stopped_early, "error": outcome.error,
            "config": trial.get("hparams", {}), "curve": curve}


def plot_trials(rows: list[dict], path: Path, metric: str, rung_steps: list[int]) -> Path:
    """The metric against training steps, one line per trial; dotted lines at ASHA's rungs, a cross where it stopped
    a trial."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for step in rung_steps:
        ax.axvline(step, color="grey", linestyle=":", linewidth=1)
    for row in rows:
        xs, ys = zip(*row["curve"], strict=True) if row["curve"] else ((), ())
        line, = ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=f"{row['trial']}: {row['label']}"[:56])
        if row["stopped_early"] and xs:
            ax.plot(xs[-1], ys[-1], marker="x", markersize=9, color=line.get_color())
    ax.set_xlim(left=0)
    ax.set_xlabel("training step (ASHA's resource; dotted: its rungs)")
    ax.set_ylabel(metric)
    ax.set_title("hyperparameter search: x = stopped early", fontsize=9)
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _print_trials(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = summary["metric"]
    table = Table(title=f"hyperparameter search: {summary['num_trials']} trials, {metric} ({summary['mode']})")
    for column in ("trial", "hyperparameters", metric, "steps", "stopped"):
        table.add_column(column, justify="left" if column in ("trial", "hyperparameters") else "right")
    for row in summary["trials"]:
        value = row[metric]
        table.add_row(row["trial"], row["label"], "" if value is None else f"{value:.4f}",
                      f"{row[RESOURCE]}/{row['total_steps']}", "early" if row["stopped_early"] else "")
    console = Console()
    console.print(table)
    best = next(r for r in summary["trials"] if r["trial"] == summary["best_trial"])
    console.print(f"best: {best['trial']} ({best['label']}): {metric} {summary[f'best_{metric}']:.4f}; "
                  f"{summary['stopped_early']} trials stopped early ({summary['steps_trained']} of "
                  f"{summary['steps_exhaustive']} steps trained); its {Path(summary['best_artifact']).name} in "
                  f"{summary['best_artifact']}; results in {out}")

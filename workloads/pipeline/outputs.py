"""What a stage produces, known before it runs: its output directory and the keys of the summary its kind's runner
writes (summary.json), so references and gates naming an output no stage makes fail at validation.

Each set is read from the runner that writes the summary (named beside it); tests/test_pipeline.py compares them with
the summaries real runs write.
"""

from __future__ import annotations

from typing import Any

OUTPUT_DIR = "output_dir"  # every stage's output: the directory its run wrote

# workloads.finetune.driver.write_outputs (also a hyperparameter search's best run)
_FINETUNE = frozenset((
    "method", "model", "base_model_path", "initial_eval_loss", "final_eval_loss", "initial_eval_perplexity",
    "final_eval_perplexity", "initial_eval_exact_match", "final_eval_exact_match", "initial_train_loss",
    "final_train_loss", "steps", "total_steps", "steps_per_epoch", "epochs", "stopped_early", "best_metric",
    "best_value", "best_step", "tokens_per_second", "train_seconds", "wall_seconds", "workers", "deepspeed_stage",
    "restarts", "artifact", "artifact_step", "merged", "checkpoint", "best_checkpoint", "storage", "tracking"))
# workloads.align.run.write_outputs and method_summary
_PAIRS = frozenset((
    "method", "initial_eval_loss", "final_eval_loss", "initial_train_loss", "final_train_loss", "steps",
    "train_pairs", "pairs_per_worker", "batches_per_worker", "held_out_pairs",
    "train_method", "model", "base_model_path", "workers", "deepspeed_stage",
    "train_seconds", "wall_seconds", "artifact", "merged", "checkpoint"))
_PAIR_METHODS = {
    "reward": frozenset(("heldout_pairwise_accuracy", "initial_eval_accuracy", "final_eval_accuracy",
                         "final_eval_margin")),
    "dpo": frozenset(("initial_margin", "final_margin", "initial_logp_margin", "final_logp_margin",
                      "final_reward_accuracy", "beta", "start_adapter")),
}
# workloads.align.rl_run.summarize and write_outputs; the totals are one per workloads.align.rl.PHASES
_RL = frozenset((
    "method", "initial_mean_reward", "final_mean_reward", "final_kl", "final_kl_coef", "first_rollout_reward",
    "last_rollout_reward", "iterations", "completions_per_iteration", "train_prompts", "held_out_prompts", "workers",
    "deepspeed_stage", "rewards", "rollouts", "total_generation_s", "total_scoring_s", "total_logprobs_s",
    "total_training_s", "total_weight_sync_s", "model", "base_model_path", "train_method", "start_adapter",
    "wall_seconds", "artifact", "merged", "restarts", "checkpoint"))
_CLIENT = ("requests", "http_requests", "retries", "cache_hits", "failures", "prompt_tokens", "completion_tokens")
# workloads.prompting.harness.evaluate
_EVAL = frozenset(("test_set", "cases", "scorer", "best_variant", "best_accuracy", "variants", *_CLIENT))
# workloads.prompting.optimizer.optimize
_OPTIMIZE = frozenset((
    "best_candidate", "best_source", "best_k", "best_dev_accuracy", "best_dev_ci95", "best_saved_as", "best_library",
    "target", "baseline_dev_accuracy", "improvement", "scorer", "teacher", "student_model", "train_cases_tried",
    "demos_kept", "candidates_tried", "dev_set", "dev_cases", "demonstrations", "proposals", "proposer_reply",
    "candidates", *_CLIENT))
# workloads.search.prompts.run
_PROMPT_SEARCH = frozenset((
    "best_variant", "best_config", "best_dev_accuracy", "best_test_accuracy", "best_test_ci95", "variants",
    "dev_cases", "test_cases", "stopped_early", "dev_requests", "wall_s", "trials"))
# workloads.search.hparams.run (with best_<metric>)
_HPARAM_SEARCH = frozenset((
    "best_trial", "best_config", "best_artifact", "best_run_dir", "metric", "mode", "num_trials", "finished",
    "stopped_early", "rungs", "steps_trained", "steps_exhaustive", "trials"))

# workloads.serve.promote.promote
_PROMOTE = frozenset(("model", "version", "alias", "switched", "previous", "gate", "scores"))
# workloads.kinds (Kind.run) adds it to a run with run.register_as: the version its artifact was registered as
REGISTERED = "registered_version"

# Kinds a pipeline runs; `serve` runs until stopped (an eval stage starts its own server), a pipeline is no stage.
STAGE_KINDS = ("finetune", "align", "eval", "optimize", "prompt_search", "hparam_search", "promote")


def summary_keys(raw: dict[str, Any], schema: type) -> frozenset[str]:
    """The keys of the summary a recipe's run writes, from its mapping (`kind`, and the `method` or `metric` that
    shape the summary, the schema's default where the mapping names none)."""
    kind = raw["kind"]
    registered = {REGISTERED} if (raw.get("run") or {}).get("register_as") else set()
    if kind == "finetune":
        return _FINETUNE | registered
    if kind == "align":
        method = raw.get("method")
        return (_PAIRS | _PAIR_METHODS[method] if method in _PAIR_METHODS else _RL) | registered
    if kind == "hparam_search":
        metric = raw.get("metric", schema.model_fields["metric"].default)
        return _HPARAM_SEARCH | {f"best_{metric}"}
    return {"eval": _EVAL, "optimize": _OPTIMIZE, "prompt_search": _PROMPT_SEARCH, "promote": _PROMOTE}[kind]


def stage_outputs(output_dir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """What later stages and gates may read from a stage: its summary's entries and its output directory."""
    return {**summary, OUTPUT_DIR: output_dir}

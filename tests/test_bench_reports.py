"""The benchmarks' reports are computed from their results files: labels, cadence timing, the Reading (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

from bench import finetune_real, finetune_report, prompt_bench, rollout_bench, serve_report
from bench._models import DEFAULT_MODEL, parameter_count, results_dir
from bench.finetune_bench import cadence_timing, shipped_cadence
from scripts.readme_numbers import REAL_BENCH_DIR, real_bench_block

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _layout(name: str, deepspeed: bool, stage: int, workers: int, cpus: int, shipped: list[str]) -> dict:
    return {"name": name, "deepspeed": deepspeed, "stage": stage, "workers": workers, "cpus_per_worker": cpus,
            "shipped_by": shipped}


def _run(layout: dict, median: float, plain: float, cadence: float | None = None) -> dict:
    entry = {"layout": layout, "steady": {"median_s": median, "min_s": median, "max_s": median, "n": 6},
             "ratio_vs_neighbour_plain": median / plain, "ratio_vs_plain": median / plain, "startup_seconds": 20.0,
             "tokens_per_second_steady": 512 / median, "plain_neighbours_s": [plain, plain], "profile_median": {}}
    if cadence is not None:
        entry["cadence"] = {"window": [3, 22], "seconds_per_step": cadence, "steps_mean_s": median,
                            "cadence_seconds_per_period": (cadence - median) * 20,
                            "ratio_vs_neighbour_plain": cadence / plain}
    return entry


def _variant(name: str, label: str, median: float, plain: float, profile: dict, **changes) -> dict:
    variant = {"name": name, "label": label, "overrides": [], "ds_config": {}, "cpus_per_worker": 1, **changes}
    return {**_run(_layout("ds2-2x1", True, 2, 2, 1, ["tiny-lora.yaml"]), median, plain), "variant": variant,
            "optimizer": "AdamW", "profile_median": profile}


def synthetic_results() -> dict:
    """A new-format results file: real DDP, the shipped layout with cadence timing, two ZeRO-2 variants."""
    plain = 2.0
    slow = {"fwd": 0.9, "bwd": 1.8, "step": 0.8, "optimizer_step": 0.5, "optimizer_allgather": 0.2,
            "optimizer_gradients": 0.05, "collectives_s": 0.9, "step_s": 3.6}
    fast = {**slow, "step": 0.35, "optimizer_step": 0.05, "step_s": 3.1}
    return {
        "machine": {"cpus": 2, "python": "3.11", "load_average_at_start": 1.0, "load_average_at_end": 1.0},
        "settings": {"global_batch": 8, "seq_len": 64, "steps": 23, "variant_steps": 8, "plain_steps": 6, "warmup": 2,
                     "method_steps": 30, "cadence": {"log_every": 5, "eval_every": 20, "checkpoint_every": 20,
                                                     "period": 20, "recipe": "workloads/configs/tiny-lora.yaml"},
                     "models": {"85M": {"num_layers": 12, "hidden_size": 768}}, "only": None},
        "started": "then", "finished": "later", "ray_init_seconds": 3.0, "memory": [], "memory_ratios": [],
        "plain": {"median_s": plain, "run_medians_s": [plain] * 3, "forward_backward_median_s": 1.5,
                  "optimizer_median_s": 0.5, "tokens_per_second": 256.0, "runs": []},
        "layouts": {
            "ray-1x2": _run(_layout("ray-1x2", False, 0, 1, 2, []), 2.2, plain, cadence=2.5),
            "ddp-2x1": _run(_layout("ddp-2x1", False, 0, 2, 1, []), 2.6, plain, cadence=2.9),
            "ds2-2x1": _run(_layout("ds2-2x1", True, 2, 2, 1, ["tiny-lora.yaml", "tiny-qlora.yaml"]), 3.8, plain,
                            cadence=4.4),
        },
        "variants": {"layout": {}, "runs": {
            "ds2-2x1-torch-adamw": _variant("ds2-2x1-torch-adamw", "torch AdamW, as shipped", 3.6, plain, slow),
            "ds2-2x1-cpuadam-offload": _variant("ds2-2x1-cpuadam-offload", "DeepSpeedCPUAdam", 3.1, plain, fast,
                                                overrides=["deepspeed.offload_optimizer=true"]),
        }},
        "methods": {"runs": {}},
        "winner": "ray-1x2",
    }


def test_layout_labels_say_what_runs_and_what_ships():
    assert finetune_report.layout_label(_layout("a", False, 0, 1, 2, [])) == \
        "Ray Train, 1 worker x 2 CPU, no DDP wrapper"
    assert finetune_report.layout_label(_layout("b", False, 0, 2, 1, [])) == "DDP, 2 workers x 1 CPU"
    shipped = _layout("c", True, 2, 2, 1, ["tiny-lora.yaml"])
    assert finetune_report.layout_label(shipped) == \
        "DeepSpeed ZeRO-2, 2 workers x 1 CPU (shipped layout: tiny-lora.yaml)"
    assert finetune_report.layout_label(shipped, shipped=False) == "DeepSpeed ZeRO-2, 2 workers x 1 CPU"


def test_shipped_layouts_come_from_the_recipes():
    shipped = finetune_report.shipped_layouts()
    assert "tiny-lora.yaml" in shipped[(True, 2, 2, 1)]
    assert "tiny-full.yaml" in shipped[(True, 3, 2, 1)]


def test_cadence_timing_covers_one_whole_period():
    period, warmup = shipped_cadence()["period"], 2
    steps = [1.0] * (warmup + period + 1)
    finished, at = [], 0.0
    for step in range(1, len(steps) + 1):
        at += 1.0 + (5.0 if step % period == 0 else 0.0)  # a checkpoint's 5 s lands before the next step ends
        finished.append([step, at])
    timing = cadence_timing({"step_seconds": steps, "step_finished_at": finished}, warmup, period)
    assert timing["window"] == [warmup + 1, warmup + period]
    assert abs(timing["cadence_seconds_per_period"] - 5.0) < 1e-9
    assert abs(timing["seconds_per_step"] - (period + 5.0) / period) < 1e-9
    assert cadence_timing({"step_seconds": steps, "step_finished_at": []}, warmup, period) is None


def test_reading_of_a_new_results_file(tmp_path):
    results = synthetic_results()
    notes = finetune_report.auto_notes(results)
    assert "Real DDP (DDP, 2 workers x 1 CPU) steps at 1.18x the one-worker run" in notes
    assert "with the shipped cadence 2.50 s/step, 1.25x (6.0 s of every 20 steps" in notes
    assert "DeepSpeedCPUAdam (AdamW stepped): 3.10 s/step, 1.55x the plain loop, -0.50 s/step" in notes
    assert "ZeRO's optimizer step 0.50 s -> 0.05 s" in notes
    # 3.1 s less 0.9 s of collectives is 2.2 s: within the 2.5 s budget, so communication is named
    assert "The 1.25x target (2.50 s/step beside a 2.00 s plain step) is out of reach" in notes
    assert "within the budget: communication (0.90 s) is what misses the target" in notes
    finetune_report.write_markdown(results, notes, tmp_path / "finetune.md")
    text = (tmp_path / "finetune.md").read_text()
    assert "| DeepSpeed ZeRO-2, 2 workers x 1 CPU (shipped layout: tiny-lora.yaml, tiny-qlora.yaml) | 3.80 |" in text
    readme = finetune_report.readme_sentences(results)
    assert "Real DDP (DDP, 2 workers x 1 CPU) steps at 1.30x" in readme
    assert "2.20x with the shipped report/eval/checkpoint cadence included" in readme
    assert "Not in that run" not in readme


def test_reading_when_compute_alone_misses_the_target():
    results = synthetic_results()
    profile = results["variants"]["runs"]["ds2-2x1-cpuadam-offload"]["profile_median"]
    profile["collectives_s"] = 0.2  # 3.1 - 0.2 - 0.05 = 2.85 s of compute: above the 2.5 s budget
    notes = finetune_report.auto_notes(results)
    assert "neither faster communication nor a faster optimizer reaches the target" in notes


def test_reading_of_the_committed_results_names_what_it_lacks():
    results = json.loads((RESULTS / "finetune.json").read_text())
    notes = finetune_report.auto_notes(results)
    assert "DDP, 1 worker" not in notes
    readme = finetune_report.readme_sentences(results)
    if not (results.get("variants") or {}).get("runs"):
        assert "ZeRO-2 optimizer and thread variants: not measured in this run." in notes
        assert "Not in that run" in readme


def _side(tokens_per_s: float) -> dict:
    return {"requests": 8, "output_tokens": 512, "wall_s": 1.0, "tokens_per_s": tokens_per_s, "p50_s": 0.5,
            "p99_s": 0.9}


def test_serve_reading_compares_ours_stock_and_the_engine(tmp_path):
    run = {"model": "tiny", "shape": {"parameters": 500_000},
           "endpoint": {"1": _side(300.0), "32": _side(1000.0)}, "stock_app": {"1": _side(320.0), "32": _side(1250.0)},
           "inprocess_vllm": {"1": _side(500.0), "32": _side(8000.0)}, "sequential_generate": _side(900.0)}
    results = {"meta": {"machine": "x86_64, 2 cores", "new_tokens_per_request": 64,
                        "requests_per_level": {"1": 16, "32": 128}, "note": "shared cores",
                        "targets_at_32": {"vs_sequential_generate": 10, "vs_inprocess_vllm": 0.7}}, "runs": [run]}
    notes = serve_report.notes(results)
    assert "keeps 0.80x the stock app's throughput; the stock app itself reaches 0.16x the engine" in notes
    assert "in-process `vllm.LLM.generate` 8000" in notes
    assert "llmc / stock by concurrency: 0.94 at 1, 0.80 at 32" in notes
    serve_report.write_markdown(results, tmp_path / "serve.md")
    assert "| tiny (0.5M) | 32 | 1000.0 (0.5 / 0.9) | 1250.0 (0.5 / 0.9) |" in (tmp_path / "serve.md").read_text()
    assert "0.80x the stock Ray Serve LLM app" in serve_report.readme_sentences(results, "serve.json")
    del run["stock_app"]
    assert "The stock Ray Serve LLM app: not measured in this run." in serve_report.notes(results)


def test_rollout_report_is_rendered_from_its_results_file_alone():
    """Every figure in rollout.md comes from rollout.json (no typed constants beside the results)."""
    from bench import rollout_bench

    results = json.loads((RESULTS / "rollout.json").read_text())
    assert (RESULTS / "rollout.md").read_text() == rollout_bench.render(results)
    assert "anchors" not in json.dumps(results) and "anchors" not in rollout_bench.render(results)


# ---------------------------------------------------------------------------------------------
# The real model (`--model smollm2-135m`, the default): its own results folder and reports
# ---------------------------------------------------------------------------------------------


def test_a_real_model_has_its_own_results_folder_and_the_tiny_results_stay():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert results_dir("smollm2-135m") == RESULTS / "smollm2-135m" == REAL_BENCH_DIR
    assert results_dir("tiny") == results_dir("small") == RESULTS


def test_parameter_count_follows_grouped_query_attention_and_tied_embeddings():
    from types import SimpleNamespace  # a config's fields, as transformers' LlamaConfig names them

    smollm2 = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True)
    assert parameter_count(smollm2) == 134_515_008  # SmolLM2-135M-Instruct's 134.5M, as loaded
    untied = SimpleNamespace(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=100, tie_word_embeddings=False)
    assert parameter_count(untied) == 2 * (4 * 128 * 128 + 3 * 128 * 256 + 2 * 128) + 2 * 100 * 128 + 128


def _real_finetune(error: str | None = None) -> dict:
    plain = [{"steady": {"median_s": m, "min_s": m, "max_s": m + 0.5, "n": 3}} for m in (3.0, 3.4)]
    platform = ({"error": error} if error else
                {"steady": {"median_s": 4.8, "min_s": 4.6, "max_s": 5.0, "n": 5}, "ratio_vs_neighbour_plain": 1.5,
                 "ratio_vs_plain": 1.55, "tokens_per_second_steady": 106.7, "startup_seconds": 61.0})
    layout = {"name": "shipped", "deepspeed": True, "stage": 2, "workers": 2, "cpus_per_worker": 1}
    return {"model": "smollm2-135m", "recipe": "workloads/configs/smollm2-lora.yaml", "method": "lora",
            "started": "then", "ray_init_seconds": 9.0,
            "machine": {"cpus": 2, "load_average_at_start": 0.5, "load_average_at_end": 1.9},
            "settings": {"global_batch": 8, "seq_len": 64, "steps": 6, "plain_steps": 4, "warmup": 1,
                         "plain_threads": 2, "layout": layout},
            "plain": {"runs": plain, "median_s": 3.2, "run_medians_s": [3.0, 3.4], "tokens_per_second": 160.0},
            "platform": {"layout": layout, **platform}}


def test_real_finetune_report_reads_the_shipped_layout_against_the_plain_loop(tmp_path):
    results = _real_finetune()
    text = finetune_real.render(results)
    assert "| DeepSpeed ZeRO-2, 2 workers x 1 CPU (smollm2-lora.yaml), through `llmc finetune`'s path | 4.80 " \
           "(4.60-5.00) | 107 | **1.50x** |" in text
    assert "| plain single-process loop, 2 torch threads (after) | 3.40 (3.40-3.90) | 151 | 1.00x |" in text
    assert "took 61 s, after 9 s of Ray start" in text
    sentence = finetune_real.readme_sentences(results, "bench/results/smollm2-135m/finetune.json")
    assert "a plain single-process torch loop takes 3.20 s per step; the shipped layout (DeepSpeed ZeRO-2, 2 " \
           "workers x 1 CPU (smollm2-lora.yaml)) steps at 1.50x that (4.80 s)" in sentence
    finetune_real.plot(results, tmp_path / "finetune.png")
    failed = _real_finetune(error="RuntimeError: no workers")
    assert "failed: RuntimeError: no workers" in finetune_real.render(failed)
    assert "failed in that run" in finetune_real.readme_sentences(failed, "x.json")


def test_serve_sentence_of_a_sized_run_names_its_sizes_and_the_generate_loop(tmp_path):
    run = {"model": "smollm2-135m", "shape": {"parameters": 134_515_008}, "endpoint": {"32": _side(60.0)},
           "stock_app": {"32": _side(62.0)}, "inprocess_vllm": {"32": _side(75.0)}, "sequential_generate": _side(15.0)}
    results = {"meta": {"machine": "x86_64, 2 cores", "new_tokens_per_request": 32, "requests_per_level": {"32": 32},
                        "sequential_generate_requests": 6, "warmup_requests": 8, "note": "shared cores",
                        "targets_at_32": {"vs_sequential_generate": 10, "vs_inprocess_vllm": 0.7}}, "runs": [run]}
    sentence = serve_report.readme_sentences(results, "bench/results/smollm2-135m/serve.json")
    assert sentence.startswith("Serving (`bench/results/smollm2-135m/serve.json`), at concurrency 32 (32 requests of "
                               "32 new tokens; 6 for the `generate` loop), the endpoint: smollm2-135m (134.5M) 60 "
                               "tokens/s (0.80x in-process vLLM, 0.97x the stock Ray Serve LLM app, 4.00x a "
                               "sequential `generate` loop)")
    serve_report.write_markdown(results, tmp_path / "serve.md")
    assert "requests: 32 at concurrency 32, 6 for (a), after 8 warm-up requests;" in (tmp_path / "serve.md").read_text()


def test_prompt_report_without_the_multi_fidelity_part():
    results = json.loads((RESULTS / "prompt.json").read_text())
    results.update({"model": "smollm2-135m", "cases_file": "workloads/bundled/json_extraction_dev.jsonl",
                    "max_tokens": 24, "multi_fidelity": None})
    text = prompt_bench.render(results)
    assert text.startswith("# Prompt-engineering benchmark (smollm2-135m, ")
    assert "cases of `workloads/bundled/json_extraction_dev.jsonl`, at most 24 tokens each" in text
    assert text.endswith("ASHA against exhaustive search: not measured in this run.\n")
    assert "ASHA" not in prompt_bench.readme_sentences(results, "p.json")


def test_prompt_reading_follows_where_the_time_goes():
    """Per request on the tiny model (concurrency gains little), per token on the real one (the engine batches)."""
    tiny = json.loads((RESULTS / "prompt.json").read_text())
    assert "more requests in flight only queue" in prompt_bench.render(tiny)
    assert (RESULTS / "prompt.md").read_text() == prompt_bench.render(tiny)
    real = json.loads((REAL_BENCH_DIR / "prompt.json").read_text())
    assert real["chat"]["ceiling_speedup"] >= prompt_bench.QUEUED
    assert "most of it decoding" in prompt_bench.render(real) and "only queue" not in prompt_bench.render(real)


def test_rollout_sentence_comes_from_its_results_file():
    results = json.loads((RESULTS / "rollout.json").read_text())
    sentence = rollout_bench.readme_sentences(results, "bench/results/rollout.json")
    assert "64 prompts x 4 completions of at most 24 tokens: the vLLM engine samples 0.21x" in sentence
    assert "weight sync into the engine 0.0187 s for the LoRA adapter, 0.02 s for the full weights" in sentence


def test_real_bench_block_names_what_is_not_measured_yet():
    block = real_bench_block({"finetune": None, "serve": None, "rollout": None, "prompt": None})
    assert block.count("not measured yet") == 4
    assert "`bench/results/smollm2-135m/rollout.json`: not measured yet (`python -m bench.rollout_bench`)." in block


def test_the_real_models_committed_reports_are_rendered_from_their_results_files(tmp_path):
    """Every Markdown table in bench/results/smollm2-135m/ is what its JSON gives (no figure typed beside it)."""
    renderers = {"finetune": finetune_real.render, "rollout": rollout_bench.render, "prompt": prompt_bench.render}
    for name, render in renderers.items():
        results = json.loads((REAL_BENCH_DIR / f"{name}.json").read_text())
        assert (REAL_BENCH_DIR / f"{name}.md").read_text() == render(results), name
    serve_report.write_markdown(json.loads((REAL_BENCH_DIR / "serve.json").read_text()), tmp_path / "serve.md")
    assert (tmp_path / "serve.md").read_text() == (REAL_BENCH_DIR / "serve.md").read_text()

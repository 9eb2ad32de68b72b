"""The numbers about the tiny model, the demo and the benchmarks in the README and the docs: generated from results
files, never typed.

    python scripts/readme_numbers.py --from-run runs/demo   # record a demo run's demo.json in
                                                             # bench/results/demo.json, then rewrite the blocks
    python scripts/readme_numbers.py                         # rewrite the blocks from bench/results/*.json

Each block sits between its begin and end markers in whichever files hold them (README.md, docs/*.md: `holders`);
tests/test_readme.py checks every one is what these results give.

The real model's skill table comes from its card (`workloads/bundled/skill_cards/smollm2-135m.json`, written by
`scripts/measure_skills.py`). The tiny-factory models' benchmark block comes from `bench/results/finetune.json`,
`serve.json` and `prompt.json` (the sentences are written by `bench.finetune_report`, `bench.serve_report` and
`bench.prompt_bench`); the real model's from `bench/results/smollm2-135m/{finetune,serve,rollout,prompt}.json` (and
`bench.finetune_real`, `bench.rollout_bench`). Each benchmark rewrites both after a full run.

The tiny model's build numbers (`bench/results/tiny_model.json`) are its `skill.json` as measured on a clean clone.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "demo.json"
README = REPO / "README.md"
DOCS = REPO / "docs"
BEGIN, END = "<!-- demo-numbers:begin (scripts/readme_numbers.py) -->", "<!-- demo-numbers:end -->"
BENCH_BEGIN, BENCH_END = "<!-- bench-numbers:begin (scripts/readme_numbers.py) -->", "<!-- bench-numbers:end -->"
BENCH_RESULTS = tuple(REPO / "bench" / "results" / f"{name}.json" for name in ("finetune", "serve", "prompt"))
SKILLS_BEGIN, SKILLS_END = "<!-- skills:begin (scripts/readme_numbers.py) -->", "<!-- skills:end -->"
SKILL_CARD = REPO / "workloads" / "bundled" / "skill_cards" / "smollm2-135m.json"
TINY_RESULTS = REPO / "bench" / "results" / "tiny_model.json"
REAL_BENCH_BEGIN = "<!-- bench-smollm2-numbers:begin (scripts/readme_numbers.py) -->"
REAL_BENCH_END = "<!-- bench-smollm2-numbers:end -->"
REAL_BENCH_DIR = REPO / "bench" / "results" / "smollm2-135m"
REAL_BENCHES = ("finetune", "serve", "rollout", "prompt")  # the sentences' order
TINY_BEGIN, TINY_END = "<!-- tiny-numbers:begin (scripts/readme_numbers.py) -->", "<!-- tiny-numbers:end -->"


def record(run_dir: Path) -> dict:
    """A demo run's numbers (its `demo.json`) without the answers and the run's own paths."""
    result = json.loads((run_dir / "demo.json").read_text())
    for stage in ("sft", "grpo"):
        result[stage].pop("artifact", None)
    for task in result["served"].values():
        task.pop("answers", None)
    return result


def block(numbers: dict) -> str:
    """The README's sentences about the demo run, from its record."""
    p, sft, grpo, served = numbers["prompting"], numbers["sft"], numbers["grpo"], numbers["served"]
    search = p["search"]
    minutes = numbers["seconds"]["total"] / 60
    return (f"The recorded run (`runs/demo/demo.json`, {minutes:.0f} minutes on this 2-core machine, "
            f"{numbers['held_out']} held-out items per task). Prompting, strict JSON match: "
            + ", ".join(f"{name} {value:.0%}" for name, value in p["accuracy"].items())
            + f"; Ray Tune tried {search['variants']} variants, ASHA stopped {search['stopped_early']} early, and "
            f"the winner ({search['best_variant']}) scored {search['best_test_accuracy']:.0%} on the test split. "
            f"LoRA SFT ({sft['steps']} steps): one-word sentiment {sft['initial_eval_exact_match']:.0%} -> "
            f"{sft['final_eval_exact_match']:.0%}, eval loss {sft['initial_eval_loss']:.3f} -> "
            f"{sft['final_eval_loss']:.3f}. GRPO ({grpo['iterations']} iterations from the base model): exact sums on "
            f"{grpo['held_out_prompts']} held-out prompts {grpo['initial_mean_reward']:.0%} -> "
            f"{grpo['final_mean_reward']:.0%}, KL {grpo['final_kl']:.2f}. "
            "Served side by side: "
            + "; ".join(f"{task} base {t['base_correct']} vs `{t['adapter']}` {t['adapter_correct']} of "
                        f"{t['questions']}" for task, t in served.items())
            + ". GRPO's rollouts are sampled and vLLM batches them as they come, so its numbers vary from run to "
              "run; the prompting and SFT numbers are greedy and repeat closely.")


def tiny_block(numbers: dict) -> str:
    """The docs' sentence about the tiny model's build, from its `skill.json` as recorded."""
    p, own, task = numbers["pretraining"], numbers["held_out_own_phrasing"], numbers["held_out_bundled_task"]
    return (f"The build measured here (its `skill.json`, from a clean clone with an empty `HOME`): {p['steps']:,} "
            f"steps x {p['batch_size']} chats in {p['seconds']:.0f} s on this 2-core machine; {own['correct']} of "
            f"{own['questions']} held-out sums right in its own phrasing, {task['correct']} of {task['questions']} in "
            "the bundled task's (\"Add the two numbers and state the sum in a sentence.\\n\\n49 + 97\", answered in "
            "the same restating style).")


def holders(begin: str) -> list[Path]:
    """The files (README.md, then docs/**/*.md) that hold the block opening with `begin`; at least one."""
    found = [path for path in (README, *sorted(DOCS.rglob("*.md"))) if begin in path.read_text()]
    if not found:
        raise SystemExit(f"no file under {REPO} holds the block {begin}")
    return found


def _replace_block(readme: str, begin: str, end: str, text: str) -> str:
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"no block between {begin} and {end}")
    return pattern.sub(lambda _: f"{begin}\n{text}\n{end}", readme)


def _rewrite_holders(begin: str, rewrite_text: Callable[[str], str]) -> None:
    """Rewrite the block opening with `begin` in every file that holds it, with `rewrite_text(text) -> text`."""
    for path in holders(begin):
        path.write_text(rewrite_text(path.read_text()))
        print(f"rewrote {begin.split(':')[0].removeprefix('<!-- ')} in {path.relative_to(REPO)}")


def rewrite(readme: str, numbers: dict) -> str:
    """`readme` with the text between the demo markers replaced by `block(numbers)`."""
    return _replace_block(readme, BEGIN, END, block(numbers))


def rewrite_tiny(readme: str, numbers: dict) -> str:
    """`readme` with the text between the tiny-model markers replaced by `tiny_block(numbers)`."""
    return _replace_block(readme, TINY_BEGIN, TINY_END, tiny_block(numbers))


def bench_block(finetune: dict, serve: dict, prompt: dict) -> str:
    """The README's sentences about the benchmarks, from the fine-tuning, serving and prompt results."""
    if str(REPO) not in sys.path:  # run as a script: bench/ is importable from the repository root
        sys.path.insert(0, str(REPO))
    from bench.finetune_report import readme_sentences as finetune_sentences
    from bench.prompt_bench import readme_sentences as prompt_sentences
    from bench.serve_report import readme_sentences as serve_sentences

    serve_text = serve_sentences(serve, "bench/results/serve.json")
    return f"{finetune_sentences(finetune)}\n\n{serve_text}\n\n{prompt_sentences(prompt, 'bench/results/prompt.json')}"


def real_bench_block(results: dict[str, dict | None]) -> str:
    """The docs' sentences about the benchmarks on the real model, from its results files (None: not run yet)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from bench import finetune_real, prompt_bench, rollout_bench, serve_report

    writers = {"finetune": finetune_real.readme_sentences, "serve": serve_report.readme_sentences,
               "rollout": rollout_bench.readme_sentences, "prompt": prompt_bench.readme_sentences}
    paragraphs = []
    for name in REAL_BENCHES:
        source = f"{(REAL_BENCH_DIR / name).relative_to(REPO)}.json"
        paragraphs.append(writers[name](results[name], source) if results.get(name) else
                          f"`{source}`: not measured yet (`python -m bench.{name}_bench`).")
    return "\n\n".join(paragraphs)


def real_bench_results() -> dict[str, dict | None]:
    """The real model's committed benchmark results, by benchmark (None where a file is missing)."""
    files = {name: REAL_BENCH_DIR / f"{name}.json" for name in REAL_BENCHES}
    return {name: json.loads(path.read_text()) if path.exists() else None for name, path in files.items()}


def rewrite_real_bench(readme: str, results: dict[str, dict | None]) -> str:
    """`readme` with the text between the real-model benchmark markers replaced by `real_bench_block(results)`."""
    return _replace_block(readme, REAL_BENCH_BEGIN, REAL_BENCH_END, real_bench_block(results))


def rewrite_bench(readme: str, finetune: dict, serve: dict, prompt: dict) -> str:
    """`readme` with the text between the benchmark markers replaced by `bench_block(...)`."""
    return _replace_block(readme, BENCH_BEGIN, BENCH_END, bench_block(finetune, serve, prompt))


def rewrite_bench_block() -> None:
    """Rewrite both benchmark blocks (tiny-factory models, real model), wherever they are, from the results files."""
    results = [json.loads(path.read_text()) for path in BENCH_RESULTS]
    _rewrite_holders(BENCH_BEGIN, lambda text: rewrite_bench(text, *results))
    real = real_bench_results()
    _rewrite_holders(REAL_BENCH_BEGIN, lambda text: rewrite_real_bench(text, real))


def rewrite_skills(readme: str, card: dict) -> str:
    """`readme` with the real model's skill table (scripts/measure_skills.py's card) between the skills markers."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from scripts.measure_skills import table

    return _replace_block(readme, SKILLS_BEGIN, SKILLS_END, table(card).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-run", type=Path, help="a demo run directory to record first (e.g. runs/demo)")
    args = parser.parse_args(argv)
    if args.from_run:
        RESULTS.write_text(json.dumps(record(args.from_run), indent=2) + "\n")
        print(f"recorded {args.from_run} in {RESULTS.relative_to(REPO)}")
    numbers, card = json.loads(RESULTS.read_text()), json.loads(SKILL_CARD.read_text())
    _rewrite_holders(BEGIN, lambda text: rewrite(text, numbers))
    tiny = json.loads(TINY_RESULTS.read_text())
    _rewrite_holders(TINY_BEGIN, lambda text: rewrite_tiny(text, tiny))
    rewrite_bench_block()
    _rewrite_holders(SKILLS_BEGIN, lambda text: rewrite_skills(text, card))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The numbers about the tiny model, the demo and the benchmarks in the README and the docs: generated from results
files, never typed.

    python scripts/readme_numbers.py --from-run runs/demo   # record a demo run in bench/results/demo.json, then
                                                             # rewrite the blocks
    python scripts/readme_numbers.py                         # rewrite the blocks from bench/results/*.json

Each block sits between its begin and end markers in whichever files hold them (README.md, docs/*.md: `holders`);
tests/test_readme.py checks every one is what these results give.

The real model's skill table comes from its card (`workloads/bundled/skill_cards/smollm2-135m.json`, written by
`scripts/measure_skills.py`). The benchmark block comes from `bench/results/finetune.json`, `serve.json` and
`prompt.json` (the sentences are written by `bench.finetune_report`, `bench.serve_report` and `bench.prompt_bench`);
`python -m bench.finetune_bench`, `bench.serve_bench` and `bench.prompt_bench` rewrite it after a full run.

A demo run holds its answers (`demo_answers.json`) and its fine-tuning summary, which names the base model whose
`skill.json` has the pretraining and the measured skill.
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


def record(run_dir: Path) -> dict:
    """The demo run's numbers: the base model's skill card, the LoRA run's length, the answers' totals."""
    answers = json.loads((run_dir / "demo_answers.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    skill = json.loads((Path(summary["base_model_path"]) / "skill.json").read_text())
    return {
        "pretraining": skill["pretraining"],
        "held_out_own_phrasing": {k: skill["held_out_own_phrasing"][k] for k in ("correct", "questions")},
        "held_out_bundled_task": {k: skill["held_out_bundled_task"][k] for k in ("correct", "questions")},
        "lora_steps": summary["steps"],
        "demo_questions": answers["questions"],
        "demo_base_correct": answers["base_correct"],
        "demo_fine_tuned_correct": answers["fine_tuned_correct"],
        **_aligned(run_dir / "align", answers),
    }


def _aligned(align_dir: Path, answers: dict) -> dict:
    """The demo's GRPO stage, when it ran: its held-out reward before and after, and the served answers' total."""
    if "aligned_correct" not in answers:
        return {}
    summary = json.loads((align_dir / "summary.json").read_text())
    return {"grpo_iterations": summary["iterations"], "grpo_held_out": summary["held_out_prompts"],
            "grpo_initial_reward": round(summary["initial_mean_reward"], 3),
            "grpo_final_reward": round(summary["final_mean_reward"], 3),
            "demo_aligned_correct": answers["aligned_correct"]}


def block(numbers: dict) -> str:
    """The README's sentences about the build and the demo, from `numbers`."""
    p, own, task = numbers["pretraining"], numbers["held_out_own_phrasing"], numbers["held_out_bundled_task"]
    return (f"The build measured here (its `skill.json`, from a clean clone with an empty `HOME`): {p['steps']:,} "
            f"steps x {p['batch_size']} chats in {p['seconds']:.0f} s on this 2-core machine; {own['correct']} of "
            f"{own['questions']} held-out sums right in its own phrasing, {task['correct']} of {task['questions']} in "
            "the bundled task's (\"Add the two numbers and state the sum in a sentence.\\n\\n49 + 97\", answered in "
            "the same restating style). The demo then served the base and its adapters through the endpoint (its "
            f"`runs/demo/demo_answers.json`): base {numbers['demo_base_correct']} of {numbers['demo_questions']} "
            f"held-out questions, the {numbers['lora_steps']}-step LoRA adapter {numbers['demo_fine_tuned_correct']} "
            f"of {numbers['demo_questions']} (final number = sum)." + _aligned_sentence(numbers))


def _aligned_sentence(numbers: dict) -> str:
    if "grpo_iterations" not in numbers:
        return ""
    return (f" GRPO from that adapter ({numbers['grpo_iterations']} iterations, exact-answer reward) took the greedy "
            f"exact answers on {numbers['grpo_held_out']} held-out prompts from {numbers['grpo_initial_reward']:.3f} "
            f"to {numbers['grpo_final_reward']:.3f}; served, the aligned adapter answered "
            f"{numbers['demo_aligned_correct']} of {numbers['demo_questions']}.")


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


def bench_block(finetune: dict, serve: dict, prompt: dict) -> str:
    """The README's sentences about the benchmarks, from the fine-tuning, serving and prompt results."""
    if str(REPO) not in sys.path:  # run as a script: bench/ is importable from the repository root
        sys.path.insert(0, str(REPO))
    from bench.finetune_report import readme_sentences as finetune_sentences
    from bench.prompt_bench import readme_sentences as prompt_sentences
    from bench.serve_report import readme_sentences as serve_sentences

    return f"{finetune_sentences(finetune)}\n\n{serve_sentences(serve)}\n\n{prompt_sentences(prompt)}"


def rewrite_bench(readme: str, finetune: dict, serve: dict, prompt: dict) -> str:
    """`readme` with the text between the benchmark markers replaced by `bench_block(...)`."""
    return _replace_block(readme, BENCH_BEGIN, BENCH_END, bench_block(finetune, serve, prompt))


def rewrite_bench_block() -> None:
    """Rewrite the benchmark block, wherever it is, from the committed results files."""
    results = [json.loads(path.read_text()) for path in BENCH_RESULTS]
    _rewrite_holders(BENCH_BEGIN, lambda text: rewrite_bench(text, *results))


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
    rewrite_bench_block()
    _rewrite_holders(SKILLS_BEGIN, lambda text: rewrite_skills(text, card))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Alias of workloads.scoring.answers, kept so that code and recipes naming `workloads.answers` (for example
`workloads.answers.final_number`, which the docs cite) keep working after the answer readers moved into
workloads.scoring. New code imports workloads.scoring.answers."""

from workloads.scoring.answers import answer_text, canonical_answer, final_number, last_number, normalize_text

__all__ = ["answer_text", "canonical_answer", "final_number", "last_number", "normalize_text"]

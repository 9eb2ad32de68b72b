"""Gates: bars on a stage's summary numbers; a stage that misses one stops the pipeline (exit 1) with the stage,
the metric, its value and the bar in the message."""

from __future__ import annotations

from typing import Any

from workloads.pipeline.recipe import GateConfig


class GateFailed(RuntimeError):
    """A stage's result missed a gate: the pipeline stops after that stage."""


def check(stage: str, gates: list[GateConfig], outputs: dict[str, Any]) -> list[str]:
    """Each gate's verdict as a line (`metric value >= bar`); raises GateFailed at the first gate missed."""
    passed = []
    for gate in gates:
        value = outputs.get(gate.metric)
        number = isinstance(value, int | float) and not isinstance(value, bool) and value == value
        for bar, holds, word in ((gate.min, lambda v, b: v >= b, ">="), (gate.max, lambda v, b: v <= b, "<=")):
            if bar is None:
                continue
            if not number or not holds(value, bar):
                raise GateFailed(f"stage {stage!r} failed its gate: {gate.metric} = {value!r}, the bar is "
                                 f"{gate.metric} {word} {bar}")
            passed.append(f"{gate.metric} {value:.4g} {word} {bar}")
    return passed

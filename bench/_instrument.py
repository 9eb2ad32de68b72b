"""What the fine-tuning bench runs in each Ray Train worker: `workloads.finetune.worker.train_worker`, instrumented.

Bench-only: the recipe, the worker code and the Ray Train run are the product's; inside the worker process
this module may (1) merge keys into the DeepSpeed config that `workloads.finetune.plan.deepspeed_config` built from the
recipe (`ds_config`: e.g. another optimizer, DeepSpeed's wall-clock timers and comms logger), (2) time every
phase of each step from DeepSpeed's own timers (`profile`), and (3) note the wall time at which rank 0 finishes
each step (`record`), so the driver can measure the step time with reports, evals and checkpoints included.
A separate module (not `bench.finetune_bench`, which runs as `__main__`) so Ray pickles the worker by name.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


def _merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested dicts key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _comm_seconds() -> float | None:
    """Seconds spent in DeepSpeed's collectives in this process so far, from the comms logger's own timers
    (one per op, never reset); None when the logger is off."""
    from deepspeed.comm import comm

    if not comm.comms_logger.enabled:
        return None
    return sum(timer.elapsed(reset=False) for timer in comm.timers.get_timers().values()) / 1e3


def _profiled(strategy_cls: type, records: list[dict], info: dict) -> type:
    """`strategy_cls` whose `train_step` appends the step's DeepSpeed timer readings (s) to `records`; the
    optimizer class that actually steps goes into `info`."""

    class Profiled(strategy_cls):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            optimizer = getattr(self.engine, "basic_optimizer", None) or self.optimizer
            fused = getattr(optimizer, "defaults", {}).get("fused")
            info["optimizer"] = type(optimizer).__name__ + (" (fused)" if fused else "")
            self._timers = self.engine.timers if self.use_deepspeed else None
            if self._timers is not None:
                self._timers.log = lambda *a, **k: None  # DeepSpeed resets its timers when it logs: read them here

        def train_step(self, micro_batches):
            comm_before, started = _comm_seconds(), time.perf_counter()
            result = super().train_step(micro_batches)
            row = {"step_s": time.perf_counter() - started}
            if self._timers is not None:
                row.update({name: timer.elapsed(reset=True) / 1e3 for name, timer in self._timers.get_timers().items()})
            comm_after = _comm_seconds()
            row["collectives_s"] = None if comm_after is None else comm_after - comm_before
            records.append(row)
            return result

    return Profiled


def instrumented_worker(options: dict, config: dict) -> None:
    """`train_worker(config)` with the bench's `options` applied in this worker process; rank 0 writes what it
    measured to `options["record"]` as JSON: `finished` ([step, wall time] per step), `profile` and `optimizer`."""
    import cluster.train
    import workloads.finetune.strategy as strategy
    import workloads.finetune.worker as finetune

    finished: list[list[float]] = []
    profile: list[dict] = []
    info: dict = {}
    if options.get("ds_config"):
        built = strategy.deepspeed_config
        strategy.deepspeed_config = lambda recipe, world: _merge(built(recipe, world), options["ds_config"])
    if options.get("profile"):
        finetune.Strategy = _profiled(finetune.Strategy, profile, info)
    publish = cluster.train.publish

    def publish_and_note(values: dict) -> None:  # rank 0, once per step, right after the step (and its eval)
        finished.append([values["step"], time.time()])
        publish(values)

    cluster.train.publish = publish_and_note
    finetune.train_worker(config)
    if finished and options.get("record"):
        Path(options["record"]).write_text(json.dumps({"finished": finished, "profile": profile, **info}))

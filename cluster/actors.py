"""Long-lived role actors beside a Ray Train run (e.g. RL rollout engines), in one placement group of their own.

The driver `start`s a group and hands its `handles` to the train loop in the run's config (actor handles travel
in it); a worker wraps one in `Remote`, whose method calls block until the actor answers, so the loop calls it as
it would a local object and never imports Ray. Before a restarted loop gets the handles, `ensure` checks every
actor and replaces a dead one on its own bundles. `stop` ends the actors and frees their resources. As OpenRLHF and
verl keep theirs, this is a thin shell: what an actor does is the plain class it is built from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

START_TIMEOUT_S = 600  # the group's resources must be free, and each actor's constructor done, by then


class ActorStartError(RuntimeError):
    """A role actor could not be placed or failed in its constructor."""


@dataclass
class ActorGroup:
    """Started role actors and the placement group holding their bundles."""

    handles: list[Any]  # ray.actor.ActorHandle, one per actor
    group: Any  # ray.util.placement_group.PlacementGroup
    spawn: Callable[[int, str], Any] = field(repr=False)  # (index, name suffix) -> a new actor on index's bundles
    replaced: int = 0  # actors `ensure` has started in place of dead ones


def start(cls: type, count: int, bundles: Sequence[dict[str, float]], *, args: tuple = (),
          actor_resources: dict[str, float] | None = None, strategy: str = "PACK", name: str = "role",
          wait: bool = True, env_vars: dict[str, str] | None = None) -> ActorGroup:
    """`count` actors of `cls(*args)`, each owning `len(bundles) // count` consecutive bundles of one placement group
    (e.g. a tensor-parallel engine: one GPU bundle per shard) and running in the first of them with
    `actor_resources` (default: that whole bundle). With `wait`, returns once every constructor has; without, once
    the resources are reserved (a call queues until its actor is up; a constructor's error surfaces there).
    `env_vars`: set in each actor's process (its runtime environment's)."""
    if count < 1 or len(bundles) % count:
        raise ValueError(f"{len(bundles)} bundles cannot be split evenly among {count} actors")
    group = placement_group([dict(b) for b in bundles], strategy=strategy, name=f"{name}-group")
    ready, _ = ray.wait([group.ready()], timeout=START_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise ActorStartError(f"{name}: the cluster has no room for {list(bundles)} ({strategy}) after "
                              f"{START_TIMEOUT_S} s (ray status shows what is free)")
    per_actor = len(bundles) // count

    def spawn(index: int, suffix: str = "") -> Any:
        own = dict(actor_resources if actor_resources is not None else bundles[index * per_actor])
        options = {"num_cpus": own.pop("CPU", 0), "num_gpus": own.pop("GPU", 0), "resources": own or None,
                   "name": f"{name}-{index}-{group.id.hex()[:8]}{suffix}", "max_restarts": 0,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       group, placement_group_bundle_index=index * per_actor,
                       placement_group_capture_child_tasks=True)}
        if env_vars:
            options["runtime_env"] = {"env_vars": dict(env_vars)}
        return ray.remote(cls).options(**options).remote(*args)

    started = ActorGroup([spawn(index) for index in range(count)], group, spawn)
    if not wait:
        return started
    try:
        ray.get([h.__ray_ready__.remote() for h in started.handles], timeout=START_TIMEOUT_S)
    except Exception as error:
        stop(started)
        raise ActorStartError(f"{name}: an actor failed to start: {error}") from error
    return started


def ensure(group: ActorGroup) -> list[int]:
    """Every actor of `group` alive (one still starting is waited for): a dead one is replaced by a new actor of the
    same class and arguments on its bundles, which the caller hands on without waiting for it. Returns the indices
    replaced. An actor that failed in its constructor is not replaced (a new one would fail the same way): that, and
    one that does not answer in START_TIMEOUT_S, is an ActorStartError."""
    replaced = []
    for index, handle in enumerate(group.handles):
        try:
            ray.get(handle.__ray_ready__.remote(), timeout=START_TIMEOUT_S)
        except ray.exceptions.RayActorError as error:
            if error.actor_init_failed:
                raise ActorStartError(f"actor {index} failed in its constructor: {error}") from error
            group.replaced += 1
            group.handles[index] = group.spawn(index, f"-{group.replaced}")
            replaced.append(index)
        except ray.exceptions.GetTimeoutError as error:
            raise ActorStartError(f"actor {index} did not answer in {START_TIMEOUT_S} s") from error
    return replaced


def stop(group: ActorGroup, close: str | None = "close") -> None:
    """Call each actor's `close` method (if it has one; errors ignored), end the actors, free the group."""
    if close:
        refs = [getattr(h, close).remote() for h in group.handles if hasattr(h, close)]
        ray.wait(refs, num_returns=len(refs), timeout=60)
    for handle in group.handles:
        ray.kill(handle, no_restart=True)
    remove_placement_group(group.group)


class Remote:
    """A role actor's handle used as the object itself: `remote.method(*args)` calls the actor and waits."""

    def __init__(self, handle: Any):
        self._handle = handle

    def __getattr__(self, method: str):
        bound = getattr(self._handle, method)
        return lambda *args, **kwargs: ray.get(bound.remote(*args, **kwargs))

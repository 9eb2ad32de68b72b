"""Long-lived role actors beside a Ray Train run (e.g. RL rollout engines), in one placement group of their own.

The driver `start`s a group and hands its `handles` to the train loop in the run's config (actor handles travel
in it); a worker wraps one in `Remote`, whose method calls block until the actor answers, so the loop calls it as
it would a local object and never imports Ray. `stop` ends the actors and frees their resources. As OpenRLHF and
verl keep theirs, this is a thin shell: what an actor does is the plain class it is built from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def start(cls: type, count: int, bundles: Sequence[dict[str, float]], *, args: tuple = (),
          actor_resources: dict[str, float] | None = None, strategy: str = "PACK", name: str = "role",
          wait: bool = True) -> ActorGroup:
    """`count` actors of `cls(*args)`, each owning `len(bundles) // count` consecutive bundles of one placement group
    (e.g. a tensor-parallel engine: one GPU bundle per shard) and running in the first of them with
    `actor_resources` (default: that whole bundle). With `wait`, returns once every constructor has; without, once
    the resources are reserved (a call queues until its actor is up; a constructor's error surfaces there)."""
    if count < 1 or len(bundles) % count:
        raise ValueError(f"{len(bundles)} bundles cannot be split evenly among {count} actors")
    group = placement_group([dict(b) for b in bundles], strategy=strategy, name=f"{name}-group")
    ready, _ = ray.wait([group.ready()], timeout=START_TIMEOUT_S)
    if not ready:
        remove_placement_group(group)
        raise ActorStartError(f"{name}: the cluster has no room for {list(bundles)} ({strategy}) after "
                              f"{START_TIMEOUT_S} s (ray status shows what is free)")
    per_actor = len(bundles) // count
    handles = []
    for index in range(count):
        own = dict(actor_resources if actor_resources is not None else bundles[index * per_actor])
        options = {"num_cpus": own.pop("CPU", 0), "num_gpus": own.pop("GPU", 0), "resources": own or None,
                   "name": f"{name}-{index}-{group.id.hex()[:8]}", "max_restarts": 0,
                   "scheduling_strategy": PlacementGroupSchedulingStrategy(
                       group, placement_group_bundle_index=index * per_actor,
                       placement_group_capture_child_tasks=True)}
        handles.append(ray.remote(cls).options(**options).remote(*args))
    if not wait:
        return ActorGroup(handles, group)
    try:
        ray.get([h.__ray_ready__.remote() for h in handles], timeout=START_TIMEOUT_S)
    except Exception as error:
        stop(ActorGroup(handles, group))
        raise ActorStartError(f"{name}: an actor failed to start: {error}") from error
    return ActorGroup(handles, group)


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

"""The alias table of a serving app: stable names clients send (`tiny:prod`) -> the adapter model id each one points
at now (`tiny:tiny-arith-v3`), with the registered model and version that adapter is.

Where it lives, and why: in one named, detached Ray actor per app (`llmc-aliases-<app>`, namespace `llmc`), which every
ingress replica asks once per request naming an alias. A switch is one write inside that actor, so every replica's
next request sees it at the same instant, requests in flight finish on the target they resolved, and nothing restarts.
Serve's `user_config` was the other candidate and guarantees neither: `serve.run` of a Python-built app gives each
deployment a new code version (Ray Serve draws a random one when none is given), which restarts its replicas, engines
included; and a reconfigure reaches replicas one after another, so for a while two replicas would answer one name with
two models. The cost is one actor call (about a millisecond) per request naming a declared alias, and none for any other
request; a replica keeps the last answer it read and uses it if the actor cannot be reached.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

NAMESPACE = "llmc"
_PREFIX = "llmc-aliases-"


@dataclass(frozen=True)
class Alias:
    """One alias as served now: clients send `name`, the engine gets `target`, an adapter of `model` at `version`."""

    name: str  # e.g. tiny:prod
    target: str  # e.g. tiny:tiny-arith-v3
    model: str  # the registered model, e.g. tiny-arith
    version: str


class AliasTable:
    """The aliases an app declares (alias -> registered model) and the target each points at; `info` is what a
    promotion needs to know about the app (its URL, adapter store, registry, gates), written once at start."""

    def __init__(self, declared: dict[str, str], info: dict[str, Any] | None = None,
                 entries: list[dict] | None = None):
        self.declared = dict(declared)
        self.info = dict(info or {})
        self.revision = 0  # counts switches
        self._entries: dict[str, Alias] = {}
        for entry in entries or []:
            self.switch(**entry)

    def switch(self, name: str, target: str, model: str, version: str) -> Alias | None:
        """Point alias `name` at `target` (an adapter of `model` at `version`); returns what it pointed at before."""
        if name not in self.declared:
            raise KeyError(f"{name!r} is not an alias of this app (declared: {', '.join(sorted(self.declared))})")
        if self.declared[name] != model:
            raise ValueError(f"alias {name!r} serves registered model {self.declared[name]!r}, not {model!r}")
        if target in self.declared:
            raise ValueError(f"alias {name!r} cannot point at another alias ({target!r})")
        before = self._entries.get(name)
        self._entries[name] = Alias(name, target, model, str(version))
        self.revision += 1
        return before

    def resolve(self, name: str) -> Alias | None:
        """The alias `name` as served now; None when it is not an alias or points at nothing yet."""
        return self._entries.get(name)

    def snapshot(self) -> dict[str, Any]:
        """Everything in the table, as plain data (what `llmc promote` and the tests read)."""
        return {"declared": dict(self.declared), "info": dict(self.info), "revision": self.revision,
                "entries": {name: asdict(alias) for name, alias in self._entries.items()}}


def alias_for(snapshot: dict[str, Any], model: str) -> str | None:
    """The alias that serves registered model `model` in a table's snapshot, if it declares one."""
    return next((name for name, served in snapshot["declared"].items() if served == model), None)


# ---------------------------------------------------------------------------------------------
# The table's actor (driver side)
# ---------------------------------------------------------------------------------------------


def actor_name(app_name: str) -> str:
    return _PREFIX + app_name


def create(app_name: str, declared: dict[str, str], info: dict[str, Any], entries: list[dict]) -> None:
    """Start the app's table (replacing one a previous run of the app left), detached: it lives as long as the app,
    which outlives the driver that deployed it, until `remove`. Never restarted: a new actor would hold the table of
    the start, not the switches since (the replicas keep serving the last targets they read instead)."""
    import ray

    remove(app_name)
    table = ray.remote(AliasTable).options(name=actor_name(app_name), namespace=NAMESPACE, lifetime="detached",
                                           num_cpus=0, max_restarts=0)
    handle = table.remote(declared, info, entries)
    ray.get(handle.__ray_ready__.remote())


def remove(app_name: str, timeout_s: float = 30) -> None:
    """End the app's table, if there is one, and wait until its name is free (a kill is asynchronous)."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.kill(ray.get_actor(actor_name(app_name), namespace=NAMESPACE), no_restart=True)
        except ValueError:  # no such actor (any more)
            return
        time.sleep(0.2)


def apps() -> list[str]:
    """The apps on the connected cluster that have an alias table."""
    import ray

    return sorted(a["name"].removeprefix(_PREFIX) for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(_PREFIX))


def snapshot(app_name: str) -> dict[str, Any]:
    """The app's table as plain data; LookupError naming the apps that have one when this one has none."""
    import ray

    return ray.get(_handle(app_name).snapshot.remote())


def switch(app_name: str, alias: Alias) -> Alias | None:
    """Point an alias of the app at a new target, for every ingress replica's next request; returns the old one."""
    import ray

    return ray.get(_handle(app_name).switch.remote(alias.name, alias.target, alias.model, alias.version))


def _handle(app_name: str):
    import ray

    try:
        return ray.get_actor(actor_name(app_name), namespace=NAMESPACE)
    except ValueError:
        raise LookupError(f"serving app {app_name!r} has no alias table on this cluster (apps with one: "
                          f"{', '.join(apps()) or 'none'})") from None


# ---------------------------------------------------------------------------------------------
# The ingress side: resolving names, renaming answers, listing aliases
# ---------------------------------------------------------------------------------------------


class AliasReader:
    """What an ingress replica knows of its app's table: the declared names (fixed at deploy), and per request the
    alias's current target, read from the actor; the last answer read is kept for when the actor is unreachable."""

    def __init__(self, app_name: str, declared: dict[str, str]):
        self.app_name = app_name
        self.declared = dict(declared)
        self._handle = None
        self._last: dict[str, Alias | None] = {}

    async def resolve(self, name: str | None) -> Alias | None:
        """The alias `name` now (None for a name that is no alias, or an alias pointing at nothing yet)."""
        if name not in self.declared:
            return None
        try:
            if self._handle is None:
                self._handle = _handle(self.app_name)
            self._last[name] = await self._handle.resolve.remote(name)
        except Exception:  # noqa: BLE001 - the actor restarting: answer from the last table read
            self._handle = None
        return self._last.get(name)

    async def entries(self) -> list[Alias]:
        """Every declared alias that points at something now."""
        found = [await self.resolve(name) for name in sorted(self.declared)]
        return [alias for alias in found if alias is not None]


def card(alias: Alias, base: dict[str, Any]) -> dict[str, Any]:
    """The `/v1/models` card of an alias: its base model's card with the alias's id, plus what it points at."""
    return {**base, "id": alias.name, "llmc_alias_of": alias.target, "llmc_model": alias.model,
            "llmc_version": alias.version}


def named(content: dict, alias: Alias | None) -> dict:
    """An answer as the client asked for it: under the alias's name, not its target's."""
    return {**content, "model": alias.name} if alias is not None else content


def renamed(response, alias: Alias):
    """A response of the engine (JSON, or a stream of server-sent events) with its `model` set to the alias's name."""
    from starlette.responses import JSONResponse, StreamingResponse

    if isinstance(response, JSONResponse) and response.status_code == 200:
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(named(json.loads(response.body), alias), headers=headers)
    if isinstance(response, StreamingResponse):
        response.body_iterator = _renamed_stream(response.body_iterator, alias.name)
    return response


async def _renamed_stream(chunks, name: str):
    async for chunk in chunks:
        yield renamed_event_stream(chunk, name)


def renamed_event_stream(chunk: str | bytes, name: str) -> str:
    """A server-sent-events chunk (one or more `data: {json}` events) with each event's `model` set to `name`."""
    text = chunk.decode() if isinstance(chunk, bytes) else chunk
    events = []
    for event in text.split("\n\n"):
        payload = event.removeprefix("data: ")
        if event.startswith("data: ") and payload.strip() != "[DONE]":
            try:
                body = json.loads(payload)
            except ValueError:  # not one JSON event: passed on as it came
                events.append(event)
                continue
            if isinstance(body, dict) and "model" in body:
                body["model"] = name
            event = "data: " + json.dumps(body)
        events.append(event)
    return "\n\n".join(events)

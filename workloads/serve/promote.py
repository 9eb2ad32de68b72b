"""`llmc promote MODEL@VERSION` and `llmc rollback MODEL`: a registered adapter version put behind its stable name on
a running endpoint (`tiny:prod`) once the gate's eval has scored it and the current champion through that endpoint;
and the champion before it put back.

The work runs in an order that leaves the champion serving whatever fails: find the app serving MODEL (its alias
table, `cluster.aliases`), the version in the registry, its adapter copied to the app's adapter store as
MODEL-vVERSION (a new folder: nothing served changes), the gate, then the switch (one write to the table, which every
ingress replica reads per request: no restart, no failed request), then the registry's aliases (`registry`).
`alias_table` is the other end: what `llmc serve` puts in the table at start (each model's champion, if any).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workloads.common import record, registry
from workloads.common.recipe import NAME_PATTERN, RecipeError
from workloads.common.record import TAG
from workloads.pipeline.gates import GateFailed
from workloads.serve.objectstore import S3Endpoint
from workloads.serve.recipe import PromoteRecipe, PromotionGateConfig, ServeRecipe

_REF = re.compile(r"^(?P<model>[^@\s]+)@(?P<version>[1-9][0-9]*)$")


def parse_ref(text: str) -> tuple[str, str]:
    """`MODEL@VERSION` -> (model, version); RecipeError naming the argument otherwise."""
    match = _REF.match(text)
    if match is None or not re.match(NAME_PATTERN, match.group("model")):
        raise RecipeError(f"field 'MODEL@VERSION': got {text!r}; write a registered model and a version number, "
                          "e.g. tiny-arith@3")
    return match.group("model"), match.group("version")


def adapter_name(model: str, version: str) -> str:
    """The adapter's folder in the store (and its name after `BASE:`): one per version, never overwritten, so an
    engine that loaded it once never serves another version's weights under it."""
    return f"{model}-v{version}"


def alias_table(recipe: ServeRecipe, store: str | None, endpoint: S3Endpoint | None
                ) -> tuple[dict[str, str], dict[str, Any], list[dict]]:
    """What `llmc serve` puts in its alias table: the declared aliases (`BASE:SERVED_AS` -> registered model), what
    a promotion needs to know (store, registry, gates) and each alias's champion, whose adapter is uploaded now."""
    from workloads.serve.deploy import publish_adapter

    base, promotion = recipe.engine.model_id, recipe.promotion
    uri = promotion.tracking_uri or record.tracking_uri(Path("runs"))
    declared = {f"{base}:{m.served_as}": name for name, m in promotion.models.items()}
    info = {"base": base, "store_uri": store, "s3_endpoint": endpoint.url if endpoint else None,
            "s3_local": bool(endpoint and endpoint.local), "tracking_uri": uri,
            "max_lora_rank": recipe.adapters.max_lora_rank,
            "gates": {name: m.gate.model_dump(mode="json") for name, m in promotion.models.items()}}
    entries = []
    for alias, model in declared.items():
        found = registry.champion(uri, model) if _may_hold_models(uri) else None
        if found is None:
            print(f"[llmc] {alias}: {model} has no champion yet (llmc promote {model}@VERSION)", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix="llmc-champion-") as tmp:
            name = adapter_name(model, found.version)
            publish_adapter(store, endpoint, name, registry.download(uri, found, tmp), recipe.adapters.max_lora_rank)
        entries.append({"name": alias, "target": f"{base}:{name}", "model": model, "version": str(found.version)})
    return declared, info, entries


def _may_hold_models(uri: str) -> bool:
    """False for an SQLite store whose file does not exist yet (nothing registered: no need to create it now)."""
    return not uri.startswith("sqlite:///") or Path(uri.removeprefix("sqlite:///")).exists()


@dataclass
class _Served:
    """The app serving a registered model: its alias table's snapshot and the alias of that model."""

    app: str
    alias: str
    table: dict[str, Any]

    @property
    def info(self) -> dict[str, Any]:
        return self.table["info"]

    @property
    def current(self) -> dict[str, str] | None:
        return self.table["entries"].get(self.alias)

    def target(self, model: str, version: str) -> str:
        return f"{self.info['base']}:{adapter_name(model, version)}"

    def publish(self, uri: str, found) -> str:
        """Copy a registered version's adapter into the app's store; returns its model id."""
        from workloads.serve.deploy import publish_adapter

        endpoint = S3Endpoint(self.info["s3_endpoint"], local=self.info["s3_local"])
        with tempfile.TemporaryDirectory(prefix="llmc-promote-") as tmp:
            publish_adapter(self.info["store_uri"], endpoint, adapter_name(found.name, found.version),
                            registry.download(uri, found, tmp), self.info["max_lora_rank"])
        return self.target(found.name, found.version)

    def switch(self, model: str, version: str) -> None:
        from cluster import aliases

        aliases.switch(self.app, aliases.Alias(self.alias, self.target(model, version), model, version))


def promote(ref: str, address: str | None = None, url: str | None = None, tracking_uri: str | None = None) -> dict:
    """Gate `MODEL@VERSION` against the champion through the live endpoint; on a pass, switch the alias to it and
    make it the registry's champion (the old one `previous`). GateFailed (exit 1) names the metric and both values."""
    model, version = parse_ref(ref)
    served = _find(model, address)
    uri = tracking_uri or served.info["tracking_uri"]
    found = _version(uri, model, version)
    current = served.current
    if current is not None and current["version"] == version:
        print(f"[llmc] {model}@{version} already serves as {served.alias}", flush=True)
        return {"model": model, "version": version, "alias": served.alias, "switched": False}
    candidate = served.publish(uri, found)
    gate = PromotionGateConfig.model_validate(served.info["gates"][model])
    champion = (current["target"], f"{model}@{current['version']}") if current else None
    values = score(gate, url or served.info["url"], (candidate, ref), champion)
    registry.tag_version(uri, model, version, {gate_tag(label, gate.metric): repr(value)
                                               for label, value in values.items()})  # kept, pass or fail
    verdict = gate_verdict(gate, ref, values[ref], champion[1] if champion else None,
                           values[champion[1]] if champion else None)
    print(f"[llmc] gate passed: {verdict}", flush=True)
    served.switch(model, version)
    previous = registry.record_promotion(uri, model, version)
    print(f"[llmc] {served.alias} -> {candidate} ({ref}); rollback target: "
          f"{f'{model}@{previous}' if previous else 'none'}", flush=True)
    return {"model": model, "version": version, "alias": served.alias, "switched": True, "previous": previous,
            "gate": verdict, "scores": values}


def run(recipe: PromoteRecipe, output_dir: str | Path | None = None, address: str | None = None) -> dict:
    """`kind: promote` (a pipeline's stage): `promote` as the recipe says, its summary written to summary.json;
    GateFailed (exit 1) when the candidate is refused, after writing nothing."""
    summary = promote(recipe.version, address=recipe.address or address, tracking_uri=recipe.tracking_uri)
    out = recipe.output_dir(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def rollback(model: str, address: str | None = None, tracking_uri: str | None = None) -> dict:
    """Put the previous champion of `model` back behind its alias (no gate: it served before), then in the
    registry; LookupError when there is none."""
    if not re.match(NAME_PATTERN, model):
        raise RecipeError(f"field 'MODEL': got {model!r}; write a registered model's name")
    served = _find(model, address)
    uri = tracking_uri or served.info["tracking_uri"]
    target = registry.rollback_target(uri, model)
    served.publish(uri, target)  # normally there already: a no-op upload of the same files
    served.switch(model, str(target.version))
    taken, now = registry.record_rollback(uri, model)
    print(f"[llmc] {served.alias} -> {served.target(model, now)} ({model}@{now}); {model}@{taken} rolled back",
          flush=True)
    return {"model": model, "version": now, "rolled_back": taken, "alias": served.alias}


def score(gate: PromotionGateConfig, url: str, *versions: tuple[str, str] | None) -> dict[str, float]:
    """The gate's metric for each (model id, label) through the endpoint at `url`: the eval recipe's variant run once
    per version with its model replaced, the response cache off (each answer comes from the live adapter)."""
    from workloads.prompting.harness import run

    versions = [v for v in versions if v is not None]
    recipe = gate_eval_recipe(gate, url, versions)
    with tempfile.TemporaryDirectory(prefix="llmc-gate-") as tmp:
        rows = {row["variant"]: row for row in run(recipe, output_dir=tmp, show=False)["variants"]}
        unanswered = {label: row["failures"] for label, row in rows.items() if row.get("failures")}
        if unanswered:  # a wrong key or a failing adapter would score 0 on both sides: never judge on that
            records = [json.loads(line) for line in (Path(tmp) / "cases.jsonl").read_text().splitlines()]
            first = next((r["error"] for r in records if r.get("error")), "not recorded")
            raise RuntimeError(f"the gate's eval at {url} got no answer to {unanswered} requests (first error: "
                               f"{first}); nothing was switched")
    missing = [label for label in rows if gate.metric not in rows[label]]
    if missing:
        numbers = sorted(k for k, v in rows[missing[0]].items() if isinstance(v, int | float))
        raise RecipeError(f"field 'promotion.models.*.gate.metric': the eval writes no {gate.metric!r}; its variants "
                          f"table has: {', '.join(numbers)}")
    return {label: float(rows[label][gate.metric]) for _, label in versions}


def gate_eval_recipe(gate: PromotionGateConfig, url: str, versions: list[tuple[str, str]]):
    """The gate's eval recipe aimed at `url`, with one copy of its variant per (model id, label)."""
    from workloads.common.recipe import read_recipe
    from workloads.kinds import validate_recipe

    raw = read_recipe(gate.eval, gate.set)
    variants = raw.get("variants") or []
    chosen = next((v for v in variants if gate.variant is None or v.get("name") == gate.variant), None)
    if chosen is None:
        raise RecipeError(f"field 'promotion.models.*.gate.variant': {gate.eval} has no variant {gate.variant!r} "
                          f"(variants: {', '.join(str(v.get('name')) for v in variants)})")
    raw["endpoint"] = {**(raw.get("endpoint") or {}), "base_url": url, "cache": False}
    raw["variants"] = [{**chosen, "name": label, "model": model} for model, label in versions]
    return validate_recipe(raw, kind="eval", source=f"gate eval {gate.eval}")


def gate_verdict(gate: PromotionGateConfig, candidate: str, value: float, champion: str | None = None,
                 champion_value: float | None = None) -> str:
    """The gate's verdict as a line; GateFailed naming the metric, the candidate's value and the bar (the
    champion's value with it) when it fails."""
    metric = gate.metric
    if gate.min is not None and not value >= gate.min:
        raise GateFailed(f"{candidate} refused: {metric} = {value:.4g}, below the bar {metric} >= {gate.min:g}; the "
                         f"champion keeps serving")
    if gate.beats_champion_by is not None and champion is not None:
        bar = champion_value + gate.beats_champion_by
        if not value >= bar:
            raise GateFailed(f"{candidate} refused: {metric} = {value:.4g} against champion {champion}'s "
                             f"{champion_value:.4g}; it must reach {bar:.4g} (the champion's plus "
                             f"{gate.beats_champion_by:g}); the champion keeps serving")
    against = f" (champion {champion}: {champion_value:.4g})" if champion is not None else " (no champion yet)"
    return f"{candidate} {metric} = {value:.4g}{against}"


def _version(uri: str, model: str, version: str):
    try:
        return registry.version(uri, model, version)
    except LookupError as exc:
        raise RecipeError(f"field 'MODEL@VERSION': {exc}") from None


def _find(model: str, address: str | None) -> _Served:
    """Connect to the cluster and find the app whose alias table serves `model` (RecipeError when none does)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise RecipeError("field '--address': promotion switches a running endpoint: give its Ray cluster's address "
                          "(--address, or RAY_ADDRESS)")
    from cluster import aliases, runtime

    print(f"[llmc] {runtime.connect(address)}", flush=True)
    tables = {app: aliases.snapshot(app) for app in aliases.apps()}
    for app, table in tables.items():
        alias = aliases.alias_for(table, model)
        if alias is not None:
            return _Served(app, alias, table)
    served = {app: sorted(table["declared"].values()) for app, table in tables.items()}
    raise RecipeError(f"field 'MODEL': no serving app on the cluster at {address} serves registered model {model!r} "
                      f"(apps and their models: {served or 'none'}); declare it under promotion.models of the serve "
                      "recipe")


def gate_tag(label: str, metric: str) -> str:
    """The version tag keeping a gate's score of `label` (`MODEL@VERSION`): MLflow refuses '@' in a tag key, so it is
    written `llmc.gate.MODEL/vVERSION.METRIC`."""
    return f"{TAG}gate.{label.replace('@', '/v')}.{metric}"

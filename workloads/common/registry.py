"""The registry of what gets served: adapters and merged models as MLflow model versions, prompts in MLflow's
prompt registry, both with their lineage.

A registered model is one name per served model (e.g. `smollm2-sentiment`); each version is one adapter (or merged
model) with tags that lead back to where it came from: the run that made it, its data and recipe digests, its base
model, its parent version and its eval scores. The aliases `candidate` and `champion` say what is proposed and what
serves, `previous` what `llmc rollback` goes back to; each champion's version is tagged with the one it replaced, so
rollbacks walk back through every promotion. Every function takes the tracking URI of the store
(`record.tracking_uri(runs_dir)` for the default one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from workloads.common.record import BY_PATH, TAG, Recording, check_store

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion, PromptVersion

    from workloads.prompting.templates import PromptTemplate

CANDIDATE, CHAMPION, PREVIOUS = "candidate", "champion", "previous"
REPLACED = f"{TAG}replaced"  # on a version made champion: the version it replaced ("" when there was none)
ROLLED_BACK = f"{TAG}rolled_back"  # on a champion taken back by `llmc rollback`: the version that serves instead
# Run tags a model version carries over: what it was trained from.
LINEAGE_TAGS = ("data_digest", "recipe_hash", "base_model", "base_model_digest", "git_commit", "kind")
PARENT = f"{TAG}parent"  # NAME/VERSION of the version this one was trained from; absent for one made from the base
ARTIFACT_PATH = f"{TAG}artifact_path"  # where the registering run wrote the files: how a later run finds its parent


def register_adapter(uri: str, name: str, run_id: str, *, artifact: str = "adapter", source: str | Path | None = None,
                     parent: str | None = None, scores: dict[str, float] | None = None,
                     tags: dict[str, str] | None = None) -> ModelVersion:
    """The next version of registered model `name` (created if new): the run's logged `artifact` (its adapter), or
    `source` (a merged model's directory, kept where it is); tagged with the run, its lineage tags, `parent`
    (NAME/VERSION, which must exist), `scores` (default: the run's eval metrics) and any further `tags`."""
    client = _client(uri)
    run = client.get_run(run_id)
    if source is None:
        if not client.list_artifacts(run_id, artifact):
            raise ValueError(f"run {run_id} has no artifact {artifact!r} (logged: "
                             f"{[a.path for a in client.list_artifacts(run_id)]}); pass source= for a model kept "
                             "elsewhere")
        source = f"{run.info.artifact_uri}/{artifact}"
    elif Path(source).exists():
        source = Path(source).resolve().as_uri()
    tags = {**(tags or {}), f"{TAG}run_id": run_id, **{f"{TAG}{t}": run.data.tags[f"{TAG}{t}"] for t in LINEAGE_TAGS
                                                       if f"{TAG}{t}" in run.data.tags}}
    if parent is not None:
        parent_name, _, parent_version = parent.partition("/")
        client.get_model_version(parent_name, parent_version)  # raises if there is no such version
        tags[PARENT] = parent
    if scores is None:
        scores = {k: v for k, v in run.data.metrics.items() if "eval" in k and not k.startswith("initial_")}
    tags.update({f"{TAG}score.{k}": repr(float(v)) for k, v in scores.items()})
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="llmcluster: adapters or merged models of one served model")
    return client.create_model_version(name, str(source), run_id=run_id, tags=tags)


def register_output(run: Recording, name: str, summary: dict) -> str:
    """What a finished command wrote (summary's `artifact`: its adapter) as the next version of `name`, alias
    `candidate`, parent the version of `name` registered from the adapter it started from (summary's
    `start_adapter`), if any; returns NAME@VERSION (`llmc promote`'s argument)."""
    if not summary.get("artifact"):
        raise ValueError(f"field 'run.register_as': the run wrote no artifact to register as {name!r}")
    path = Path(summary["artifact"]).resolve()
    inside = path.is_relative_to(run.out) and path.relative_to(run.out).parts[0] not in BY_PATH
    where = {"artifact": path.relative_to(run.out).as_posix()} if inside else {"source": path}
    found = register_adapter(run.uri, name, run.run_id, parent=_registered_from(run.uri, name,
                                                                               summary.get("start_adapter")),
                             tags={ARTIFACT_PATH: str(path)}, **where)
    set_alias(run.uri, name, CANDIDATE, found.version)
    return f"{name}@{found.version}"


def _registered_from(uri: str, name: str, adapter: str | None) -> str | None:
    """NAME/VERSION of the newest version of `name` registered from the directory `adapter`; None when none was."""
    if not adapter:
        return None
    path = str(Path(adapter).resolve())
    found = [v for v in _client(uri).search_model_versions(f"name = '{name}'") if v.tags.get(ARTIFACT_PATH) == path]
    return f"{name}/{max(int(v.version) for v in found)}" if found else None


def set_alias(uri: str, name: str, alias: str, version: str | int) -> None:
    """Point `alias` (candidate, champion, ...) of `name` at `version`."""
    _client(uri).set_registered_model_alias(name, alias, str(version))


def champion(uri: str, name: str) -> ModelVersion | None:
    """The version `name`'s champion alias points at; None before any."""
    return _by_alias(uri, name, CHAMPION)


def candidate(uri: str, name: str) -> ModelVersion | None:
    """The version `name`'s candidate alias points at; None before any."""
    return _by_alias(uri, name, CANDIDATE)


def version(uri: str, name: str, number: str | int) -> ModelVersion:
    """Version `number` of registered model `name`; LookupError naming what exists when there is no such version."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    try:
        return client.get_model_version(name, str(number))
    except MlflowException:
        known = [str(v.version) for v in client.search_model_versions(f"name = '{name}'")]
        raise LookupError(f"registered model {name!r} has no version {number} in {uri} (versions: "
                          f"{', '.join(sorted(known, key=int)) or 'none'})") from None


def tag_version(uri: str, name: str, number: str | int, tags: dict[str, str]) -> None:
    """Set tags on version `number` of `name` (e.g. a promotion gate's scores)."""
    client = _client(uri)
    for key, value in tags.items():
        client.set_model_version_tag(name, str(number), key, value)


def record_promotion(uri: str, name: str, number: str | int) -> str | None:
    """`number` becomes `name`'s champion and the champion before it (if any) the `previous` alias, which the new
    champion's REPLACED tag also keeps; returns that previous version."""
    client, before = _client(uri), champion(uri, name)
    previous = str(before.version) if before is not None else None
    client.set_model_version_tag(name, str(number), REPLACED, previous or "")
    client.set_registered_model_alias(name, CHAMPION, str(number))
    if previous is not None:
        client.set_registered_model_alias(name, PREVIOUS, previous)
    return previous


def rollback_target(uri: str, name: str) -> ModelVersion:
    """The version `llmc rollback` goes back to: the `previous` alias; LookupError when there is none."""
    found = _by_alias(uri, name, PREVIOUS)
    if found is None:
        now = champion(uri, name)
        raise LookupError(f"registered model {name!r} has no previous champion to roll back to (champion: "
                          f"{now.version if now else 'none'})")
    return found


def record_rollback(uri: str, name: str) -> tuple[str, str]:
    """The `previous` version becomes champion again, the one it replaced (if any) becomes `previous`, and the
    champion taken back is tagged ROLLED_BACK; returns (taken back, now champion)."""
    client, target, taken = _client(uri), rollback_target(uri, name), champion(uri, name)
    back, taken_back = str(target.version), str(taken.version) if taken is not None else ""
    if taken_back:
        client.set_model_version_tag(name, taken_back, ROLLED_BACK, back)
    client.set_registered_model_alias(name, CHAMPION, back)
    earlier = target.tags.get(REPLACED)
    if earlier:
        client.set_registered_model_alias(name, PREVIOUS, earlier)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    return taken_back, back


def download(uri: str, found: ModelVersion, into: str | Path) -> Path:
    """The version's files (its adapter) copied from the artifact store into the directory `into`."""
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(artifact_uri=found.source, dst_path=str(into), tracking_uri=uri))


def lineage(uri: str, name: str, version: str | int) -> list[ModelVersion]:
    """This version, then its parent, its parent's parent, ... back to one trained from the base model."""
    client, chain = _client(uri), []
    at: tuple[str, str] | None = (name, str(version))
    while at is not None:
        found = client.get_model_version(*at)
        if any((v.name, v.version) == (found.name, found.version) for v in chain):
            raise ValueError(f"model version {found.name}/{found.version}: its parents form a cycle")
        chain.append(found)
        parent = found.tags.get(PARENT)
        at = tuple(parent.split("/", 1)) if parent else None
    return chain


def register_prompt(uri: str, entry: PromptTemplate, library: str | Path, run: Recording | None = None
                    ) -> PromptVersion:
    """A prompt-library entry as the next version of its name in MLflow's prompt registry: its chat messages with
    `{{variable}}` placeholders, tagged with its NAME@VERSION in `library`, score and lineage (parents, method),
    and linked to the run that wrote it."""
    client = _client(uri)
    placeholders = {name: "{{" + name + "}}" for name in entry.variables}
    lineage_ = entry.lineage
    tags = {f"{TAG}ref": entry.ref, f"{TAG}library": str(Path(library).resolve()), f"{TAG}kind": entry.kind,
            **({f"{TAG}score": repr(entry.score)} if entry.score is not None else {}),
            **({f"{TAG}parents": ",".join(lineage_.parents), f"{TAG}method": lineage_.method} if lineage_ else {}),
            **({f"{TAG}run_id": run.run_id} if run else {})}
    version = client.register_prompt(entry.name, entry.render_messages(placeholders),
                                     commit_message=entry.description or entry.ref, tags=tags)
    if run is not None:
        # MLflow's registry store links through the process's tracking store, not the client's: point it at `uri`.
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(uri):
            client.link_prompt_version_to_run(run.run_id, version)
    return version


def _by_alias(uri: str, name: str, alias: str) -> ModelVersion | None:
    from mlflow.exceptions import MlflowException

    try:
        return _client(uri).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _client(uri: str):
    check_store(uri)
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)

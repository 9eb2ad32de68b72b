"""Promotion and rollback of a registered adapter behind a stable served name (`llmc promote`, `llmc rollback`).

Fast: the alias table's rules, answers renamed to the alias (JSON and server-sent events), the promotion recipe's
checks, the registry's bookkeeping on a real SQLite MLflow store, the gate's verdicts and eval recipe, and the CLI's
exit statuses before any cluster work. Slow (the session's `server`, which declares `tiny-arith` as `tiny:prod`):
promotion and rollback under 8 concurrent clients with no failed request, answers switching to the candidate's own and
back, `/v1/models` showing the version; and the gate refusing a zero-step adapter while the champion keeps serving.
Those run last on that server (`last_on_server`): the adapters they publish and the alias show in its listing.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from starlette.responses import JSONResponse, StreamingResponse

from cluster.aliases import Alias, AliasReader, AliasTable, alias_for, card, named, renamed, renamed_event_stream
from tests.conftest import GATE_KEY_ENV, PROMOTED_MODEL, SERVE_RECIPE, run_llmc
from tests.test_serve import replica_processes
from workloads.common import registry, tracking
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe
from workloads.pipeline.gates import GateFailed
from workloads.serve.objectstore import LocalS3, free_port
from workloads.serve.promote import adapter_name, alias_table, gate_eval_recipe, gate_verdict, parse_ref, score
from workloads.serve.recipe import PromotionGateConfig

EVAL = "workloads/configs/tiny-eval.yaml"
GATE = {"eval": EVAL, "variant": "adapter", "beats_champion_by": 0.1}
PROMOTION = f"{{m: {{gate: {{eval: {EVAL}, min: 0.5}}}}}}"

# ---------------------------------------------------------------------------------------------
# The alias table and the answers it renames
# ---------------------------------------------------------------------------------------------


def test_an_alias_switches_to_a_declared_models_adapter_and_says_what_it_replaced():
    table = AliasTable({"tiny:prod": "tiny-arith"}, {"url": "http://x/v1"},
                       [{"name": "tiny:prod", "target": "tiny:tiny-arith-v1", "model": "tiny-arith", "version": "1"}])
    assert table.resolve("tiny:prod") == Alias("tiny:prod", "tiny:tiny-arith-v1", "tiny-arith", "1")
    assert table.resolve("tiny") is None and table.resolve("tiny:arith") is None
    before = table.switch("tiny:prod", "tiny:tiny-arith-v2", "tiny-arith", 2)
    assert before.version == "1" and table.resolve("tiny:prod").target == "tiny:tiny-arith-v2"
    snap = table.snapshot()
    assert snap["revision"] == 2 and snap["info"] == {"url": "http://x/v1"}
    assert snap["entries"]["tiny:prod"]["version"] == "2"
    assert alias_for(snap, "tiny-arith") == "tiny:prod" and alias_for(snap, "other") is None


def test_the_alias_table_refuses_undeclared_names_other_models_and_aliases_of_aliases():
    table = AliasTable({"tiny:prod": "tiny-arith", "tiny:chat": "tiny-chat"})
    with pytest.raises(KeyError, match="'tiny:canary' is not an alias of this app .*tiny:chat, tiny:prod"):
        table.switch("tiny:canary", "tiny:x", "tiny-arith", "1")
    with pytest.raises(ValueError, match="serves registered model 'tiny-arith', not 'tiny-chat'"):
        table.switch("tiny:prod", "tiny:tiny-chat-v1", "tiny-chat", "1")
    with pytest.raises(ValueError, match="cannot point at another alias"):
        table.switch("tiny:prod", "tiny:chat", "tiny-arith", "1")
    assert table.resolve("tiny:prod") is None and table.revision == 0


ALIAS = Alias("tiny:prod", "tiny:tiny-arith-v2", "tiny-arith", "2")


def test_a_replica_asks_the_table_only_about_declared_aliases():
    """Any other name is answered at once, without Ray (none is running here): only alias requests pay the call."""
    reader = AliasReader("llmc", {"tiny:prod": "tiny-arith"})
    assert asyncio.run(reader.resolve("tiny")) is None and asyncio.run(reader.resolve(None)) is None
    assert reader._handle is None


def test_answers_and_model_cards_carry_the_alias_and_what_it_points_at():
    assert named({"model": "tiny:tiny-arith-v2", "id": "c"}, ALIAS) == {"model": "tiny:prod", "id": "c"}
    assert named({"model": "tiny"}, None) == {"model": "tiny"}
    base = {"id": "tiny", "object": "model", "owned_by": "llmc", "permission": [], "metadata": {"a": 1}}
    assert card(ALIAS, base) == {**base, "id": "tiny:prod", "llmc_alias_of": "tiny:tiny-arith-v2",
                                 "llmc_model": "tiny-arith", "llmc_version": "2"}
    response = renamed(JSONResponse({"model": "tiny:tiny-arith-v2", "choices": []}, headers={"x-a": "b"}), ALIAS)
    assert json.loads(response.body) == {"model": "tiny:prod", "choices": []}
    assert response.headers["x-a"] == "b" and response.headers["content-length"] == str(len(response.body))


def test_a_streamed_answer_is_renamed_event_by_event():
    first = {"id": "1", "model": "tiny:tiny-arith-v2", "choices": [{"delta": {"content": "The"}}]}
    chunk = f"data: {json.dumps(first)}\n\ndata: {json.dumps({**first, 'id': '2'})}\n\n"
    events = [e for e in renamed_event_stream(chunk, "tiny:prod").split("\n\n") if e]
    assert [json.loads(e.removeprefix("data: "))["model"] for e in events] == ["tiny:prod", "tiny:prod"]
    assert renamed_event_stream(b"data: [DONE]\n\n", "tiny:prod") == "data: [DONE]\n\n"

    async def chunks():
        yield chunk
        yield "data: [DONE]\n\n"

    async def read(response) -> str:
        return "".join([c async for c in response.body_iterator])

    text = asyncio.run(read(renamed(StreamingResponse(chunks(), media_type="text/event-stream"), ALIAS)))
    assert "tiny:tiny-arith-v2" not in text and text.count('"model": "tiny:prod"') == 2 and text.endswith("[DONE]\n\n")


# ---------------------------------------------------------------------------------------------
# The recipe: promotion.models and their gates
# ---------------------------------------------------------------------------------------------


def test_a_promoted_model_is_served_as_prod_by_default_and_its_gate_needs_a_bar():
    recipe = load_recipe(SERVE_RECIPE, [f"promotion.models={PROMOTION}"], kind="serve")
    assert recipe.promotion.models["m"].served_as == "prod"
    assert recipe.promotion.models["m"].gate.metric == "accuracy"
    with pytest.raises(RecipeError, match=r"promotion.models.m.gate.*give min, beats_champion_by or both"):
        load_recipe(SERVE_RECIPE, [f"promotion.models={{m: {{gate: {{eval: {EVAL}}}}}}}"], kind="serve")


@pytest.mark.parametrize(("overrides", "message"), [
    ([f"promotion.models={{m: {{gate: {{eval: {EVAL}, min: 0}}}}, n: {{gate: {{eval: {EVAL}, min: 0}}}}}}"],
     r"field 'promotion.models'.*two models are served under one name"),
    ([f"promotion.models={PROMOTION}", "adapters.enabled=false"],
     r"promotion.models serves adapters: set adapters.enabled: true"),
    ([f"promotion.models={{m: {{served_as: arith, gate: {{eval: {EVAL}, min: 0}}}}}}"],
     r"served_as \['arith'\] is also an adapter of adapters.paths"),
    ([f"promotion.models={{'m/x': {{gate: {{eval: {EVAL}, min: 0}}}}}}"],
     r"registered model names \['m/x'\] may hold only"),
])
def test_promotion_settings_that_cannot_work_are_refused_naming_the_field(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(SERVE_RECIPE, overrides, kind="serve")


# ---------------------------------------------------------------------------------------------
# The registry's bookkeeping (real MLflow on SQLite)
# ---------------------------------------------------------------------------------------------


def _adapter_dir(path: Path, marker: str) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "marker": marker}))
    return path


@pytest.fixture
def store(tmp_path) -> tuple[str, list[str]]:
    """A SQLite MLflow store with three versions of `tiny-arith`, each from its own adapter directory."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tracking.MLflowRun(uri, "llmc", "promote-test", artifact_location=(tmp_path / "mlartifacts").as_uri())
    versions = [registry.register_adapter(uri, "tiny-arith", run.run_id,
                                          source=_adapter_dir(tmp_path / f"adapter{n}", str(n))).version
                for n in (1, 2, 3)]
    versions = [str(v) for v in versions]  # MLflow returns numbers; the registry's functions take either
    run.close(False)
    return uri, versions


def test_promotions_keep_the_champion_before_as_previous_and_rollbacks_walk_back(store, tmp_path):
    uri, (v1, v2, v3) = store
    assert registry.record_promotion(uri, "tiny-arith", v1) is None
    with pytest.raises(LookupError, match="'tiny-arith' has no previous champion to roll back to .champion: 1"):
        registry.rollback_target(uri, "tiny-arith")
    assert registry.record_promotion(uri, "tiny-arith", v2) == v1
    assert registry.record_promotion(uri, "tiny-arith", v3) == v2
    assert str(registry.champion(uri, "tiny-arith").version) == v3
    assert str(registry.rollback_target(uri, "tiny-arith").version) == v2
    assert registry.record_rollback(uri, "tiny-arith") == (v3, v2)
    assert registry.version(uri, "tiny-arith", v3).tags[registry.ROLLED_BACK] == v2
    assert registry.record_rollback(uri, "tiny-arith") == (v2, v1)  # v2 had replaced v1
    assert str(registry.champion(uri, "tiny-arith").version) == v1
    with pytest.raises(LookupError, match="no previous champion"):  # v1 replaced nothing
        registry.rollback_target(uri, "tiny-arith")
    files = registry.download(uri, registry.version(uri, "tiny-arith", v2), tmp_path / "got")
    assert json.loads((files / "adapter_config.json").read_text())["marker"] == "2"


def test_serving_starts_each_alias_on_its_champion_copied_into_the_adapter_store(store, tmp_path):
    """What `llmc serve` puts in its alias table (a real SQLite registry, a real local S3 store): the champion's
    adapter uploaded as MODEL-vVERSION and the alias pointing at it; a registry file that does not exist yet holds no
    champion and is not created."""
    uri, (_, v2, _) = store
    registry.record_promotion(uri, "tiny-arith", v2)
    sets = [f"promotion.models={{tiny-arith: {{gate: {{eval: {EVAL}, min: 0.5}}}}}}"]
    with LocalS3() as s3:
        recipe = load_recipe(SERVE_RECIPE, [*sets, f"promotion.tracking_uri={uri}"], kind="serve")
        declared, info, entries = alias_table(recipe, "s3://llmc-adapters/tiny", s3.endpoint)
        keys = [o["Key"] for o in s3.endpoint.client().list_objects_v2(Bucket="llmc-adapters")["Contents"]]
    assert declared == {"tiny:prod": "tiny-arith"}
    assert entries == [{"name": "tiny:prod", "target": "tiny:tiny-arith-v2", "model": "tiny-arith", "version": v2}]
    assert keys == ["tiny/tiny-arith-v2/adapter_config.json"]
    assert info["tracking_uri"] == uri and info["gates"]["tiny-arith"]["min"] == 0.5 and info["s3_local"] is True
    missing = tmp_path / "none" / "mlflow.db"
    recipe = load_recipe(SERVE_RECIPE, [*sets, f"promotion.tracking_uri=sqlite:///{missing}"], kind="serve")
    assert alias_table(recipe, "s3://llmc-adapters/tiny", None)[2] == [] and not missing.parent.exists()


def test_a_version_that_does_not_exist_is_named_with_those_that_do(store):
    uri, _ = store
    with pytest.raises(LookupError, match=r"'tiny-arith' has no version 9 in sqlite.* \(versions: 1, 2, 3\)"):
        registry.version(uri, "tiny-arith", 9)


# ---------------------------------------------------------------------------------------------
# The gate, and the command before any cluster work
# ---------------------------------------------------------------------------------------------


def test_the_gate_names_the_metric_and_both_values_when_it_refuses():
    gate = PromotionGateConfig(**GATE)
    assert gate_verdict(gate, "m@2", 0.8, "m@1", 0.5) == "m@2 accuracy = 0.8 (champion m@1: 0.5)"
    assert gate_verdict(gate, "m@1", 0.1) == "m@1 accuracy = 0.1 (no champion yet)"
    with pytest.raises(GateFailed, match=r"m@3 refused: accuracy = 0.55 against champion m@2's 0.5; it must reach "
                                         r"0.6 \(the champion's plus 0.1\); the champion keeps serving"):
        gate_verdict(gate, "m@3", 0.55, "m@2", 0.5)
    with pytest.raises(GateFailed, match=r"m@3 refused: accuracy = 0.2, below the bar accuracy >= 0.3"):
        gate_verdict(PromotionGateConfig(eval=EVAL, min=0.3), "m@3", 0.2, "m@2", 0.1)


def test_the_gate_eval_runs_the_chosen_variant_once_per_version_on_the_live_endpoint():
    gate = PromotionGateConfig(**GATE, set=["test_set.limit=7"])
    recipe = gate_eval_recipe(gate, "http://127.0.0.1:9/v1", [("tiny:m-v2", "m@2"), ("tiny:m-v1", "m@1")])
    assert [(v.name, v.model, v.prompt) for v in recipe.variants] == [("m@2", "tiny:m-v2", "arithmetic-bundled"),
                                                                       ("m@1", "tiny:m-v1", "arithmetic-bundled")]
    assert recipe.endpoint.base_url == "http://127.0.0.1:9/v1" and recipe.endpoint.cache is False
    assert recipe.test_set.limit == 7
    with pytest.raises(RecipeError, match="has no variant 'nope' .variants: base, base-own-phrasing"):
        gate_eval_recipe(PromotionGateConfig(eval=EVAL, variant="nope", min=0), "http://x/v1", [("a", "b")])


def test_a_gate_whose_eval_gets_no_answers_judges_nothing():
    """Unanswered requests (a wrong key, a dead endpoint) would score 0 for candidate and champion alike: the gate
    stops with the count and the first error instead of comparing zeros."""
    gate = PromotionGateConfig(**GATE, set=["test_set.limit=2", "endpoint.max_retries=0"])
    with pytest.raises(RuntimeError, match=r"got no answer to \{'m@2': 2, 'm@1': 2\} requests \(first error: .*\); "
                                           "nothing was switched"):
        score(gate, f"http://127.0.0.1:{free_port()}/v1", ("tiny:m-v2", "m@2"), ("tiny:m-v1", "m@1"))


def test_a_version_reference_is_model_at_number():
    assert parse_ref("tiny-arith@12") == ("tiny-arith", "12") and adapter_name("tiny-arith", "12") == "tiny-arith-v12"
    for bad in ("tiny-arith", "tiny-arith@", "tiny-arith@v2", "@3", "a/b@1", "m@0"):
        with pytest.raises(RecipeError, match="field 'MODEL@VERSION'"):
            parse_ref(bad)


def test_promote_and_rollback_exit_2_naming_the_argument_before_any_cluster_work():
    bad_ref = run_llmc("promote", "tiny-arith", env={"RAY_ADDRESS": ""}, timeout=120)
    assert bad_ref.returncode == 2 and "field 'MODEL@VERSION': got 'tiny-arith'" in bad_ref.stderr, bad_ref.stderr
    no_cluster = run_llmc("rollback", "tiny-arith", env={"RAY_ADDRESS": ""}, timeout=120)
    assert no_cluster.returncode == 2 and "field '--address'" in no_cluster.stderr, no_cluster.stderr
    assert "Ray" not in no_cluster.stdout  # nothing connected, nothing started


# ---------------------------------------------------------------------------------------------
# On the session's server: promotion and rollback under load, and a refused candidate
# ---------------------------------------------------------------------------------------------

LOAD_CLIENTS = 8
QUESTIONS = ["17 + 72", "32 + 15", "63 + 97", "57 + 60"]


def zero_step_adapter(model_dir: Path, out_dir: Path) -> Path:
    """A LoRA adapter for the tiny model trained zero steps (B is zero: it answers as the base model does)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"])
    get_peft_model(base, config).save_pretrained(str(out_dir))
    return out_dir


@pytest.fixture(scope="module")
def versions(server, lora_run, tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """In the server's registry: v1 a zero-step adapter, v2 `lora_run`'s trained adapter (served as `tiny:arith`
    too), v3 another zero-step adapter; registered from one run of that store."""
    root = tmp_path_factory.mktemp("promote")
    uri = server.registry_uri
    run = tracking.MLflowRun(uri, "llmc", "promote-test", artifact_location=(root / "mlartifacts").as_uri())
    sources = {"zero": zero_step_adapter(tiny_model_dir, root / "zero"), "trained": lora_run["adapter"],
               "zero-again": zero_step_adapter(tiny_model_dir, root / "zero-again")}
    found = {name: str(registry.register_adapter(uri, PROMOTED_MODEL, run.run_id, source=path).version)
             for name, path in sources.items()}
    run.close(False)
    return found


def _llmc(server, *args: str):
    started = time.monotonic()
    result = run_llmc(*args, env={GATE_KEY_ENV: server.key}, timeout=600)
    print(f"llmc {' '.join(args)}: exit {result.returncode} in {time.monotonic() - started:.1f} s")
    return result


def _listed(server) -> dict[str, dict]:
    models = httpx.get(f"{server.base}/v1/models", headers=server.headers, timeout=60).json()["data"]
    return {card["id"]: card for card in models}


def _answers(server, model: str, key: str | None = None) -> list[str]:
    """Greedy answers of `model` to the bundled arithmetic questions, in the bundled prompt's chat format."""
    from workloads.prompting.templates import load_library

    template, client = load_library().get("arithmetic-bundled"), server.client(key)
    replies = [client.chat.completions.create(model=model, messages=template.render_messages({"input": q}),
                                              max_tokens=12, temperature=0) for q in QUESTIONS]
    assert {reply.model for reply in replies} == {model}  # an alias answers under its own name
    return [reply.choices[0].message.content for reply in replies]


class Load:
    """LOAD_CLIENTS threads asking `tiny:prod` without pause (sampled, so the response cache answers none; every
    other one streaming) until stopped; every error is counted, and the model name of every answer kept."""

    def __init__(self, server):
        self.server, self.stop, self.errors, self.answered, self.names = server, threading.Event(), [], 0, set()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._ask, args=(n,), daemon=True) for n in range(LOAD_CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _ask(self, n: int) -> None:
        client = self.server.client()
        while not self.stop.is_set():
            try:
                request = {"model": "tiny:prod", "messages": [{"role": "user", "content": QUESTIONS[n % 4]}],
                           "max_tokens": 8, "temperature": 0.8}
                if n % 2:
                    names = {chunk.model for chunk in client.chat.completions.create(**request, stream=True)}
                else:
                    names = {client.chat.completions.create(**request).model}
                with self._lock:
                    self.answered += 1
                    self.names |= names
            except Exception as exc:  # noqa: BLE001 - counted: the test requires none
                with self._lock:
                    self.errors.append(repr(exc))

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=300)


@pytest.mark.slow
@pytest.mark.last_on_server
def test_promote_and_rollback_under_load_switch_the_alias_with_no_failed_request(server, versions, ray_cluster):
    """`tiny:prod` first gets the zero-step adapter (no champion to beat); under 8 clients the trained adapter is
    promoted (the gate's eval sees it beat the champion) and rolled back: no request fails, no replica restarts, the
    alias's greedy answers are the candidate adapter's own and then the old champion's again, and `/v1/models` shows
    each version."""
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.address, log_to_driver=False)
    zero, trained = versions["zero"], versions["trained"]
    first = _llmc(server, "promote", f"{PROMOTED_MODEL}@{zero}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "(no champion yet)" in first.stdout
    assert _listed(server)["tiny:prod"]["llmc_version"] == zero
    zero_answers = _answers(server, f"tiny:{adapter_name(PROMOTED_MODEL, zero)}", server.other_key)
    trained_answers = _answers(server, "tiny:arith", server.other_key)  # the same adapter, under its own name
    assert zero_answers != trained_answers  # the switch is visible in the answers
    replicas = {name: set(replica_processes(name)) for name in ("ingress", "LLMServer:tiny")}
    load = Load(server)
    try:
        assert _answers(server, "tiny:prod") == zero_answers
        promoted = _llmc(server, "promote", f"{PROMOTED_MODEL}@{trained}")
        assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
        card = _listed(server)["tiny:prod"]
        assert (card["llmc_version"], card["llmc_alias_of"]) == (trained, f"tiny:{PROMOTED_MODEL}-v{trained}")
        assert _answers(server, "tiny:prod") == trained_answers
        answered_before = load.answered
        rolled = _llmc(server, "rollback", PROMOTED_MODEL)
        assert rolled.returncode == 0, rolled.stdout[-3000:] + rolled.stderr[-3000:]
        assert _listed(server)["tiny:prod"]["llmc_version"] == zero
        assert _answers(server, "tiny:prod") == zero_answers
        time.sleep(2)
    finally:
        load.finish()
    assert not load.errors, load.errors[:5]
    # No replica restarted: the same ingress replica, and every engine replica still there (load may add one).
    assert set(replica_processes("ingress")) == replicas["ingress"]
    assert set(replica_processes("LLMServer:tiny")) >= replicas["LLMServer:tiny"]
    assert load.answered > answered_before > 0 and load.names == {"tiny:prod"}
    print(f"{load.answered} answers under load, none failed")
    assert str(registry.champion(server.registry_uri, PROMOTED_MODEL).version) == zero
    assert registry.version(server.registry_uri, PROMOTED_MODEL, trained).tags[registry.ROLLED_BACK] == zero


@pytest.mark.slow
@pytest.mark.last_on_server
def test_the_gate_refuses_a_worse_candidate_naming_the_metric_and_both_values(server, versions):
    """With the trained adapter as champion, a zero-step adapter is refused (exit 1, the metric and both values in
    the message); the champion keeps serving under the alias, in `/v1/models` and in the registry."""
    trained, worse = versions["trained"], versions["zero-again"]
    if _listed(server).get("tiny:prod", {}).get("llmc_version") != trained:
        promoted = _llmc(server, "promote", f"{PROMOTED_MODEL}@{trained}")
        assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    refused = _llmc(server, "promote", f"{PROMOTED_MODEL}@{worse}")
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    found = re.search(rf"{PROMOTED_MODEL}@{worse} refused: accuracy = ([0-9.e-]+) against champion "
                      rf"{PROMOTED_MODEL}@{trained}'s ([0-9.e-]+)", refused.stderr)
    assert found, refused.stderr[-3000:]
    assert float(found.group(1)) < float(found.group(2)) + 0.1
    assert _listed(server)["tiny:prod"]["llmc_version"] == trained
    assert _answers(server, "tiny:prod") == _answers(server, "tiny:arith", server.other_key)
    assert str(registry.champion(server.registry_uri, PROMOTED_MODEL).version) == trained
    gate_tags = registry.version(server.registry_uri, PROMOTED_MODEL, worse).tags  # the refusal's scores are kept
    kept = float(gate_tags[f"llmc.gate.{PROMOTED_MODEL}/v{worse}.accuracy"])
    assert kept == pytest.approx(float(found.group(1)), abs=1e-3)


@pytest.mark.slow
@pytest.mark.last_on_server
def test_a_pipeline_registers_its_adapter_and_its_promote_stage_is_gated_on_the_live_endpoint(
        server, versions, ray_cluster, tmp_path):
    """A pipeline on the server's cluster: a 2-step LoRA stage registered as the next `tiny-arith` version (recorded
    in the endpoint's registry, its run the stage's nested run), then a promote stage: the endpoint's gate finds it
    no better than the trained champion, the pipeline exits 1 naming the metric and both values, nothing switches."""
    trained = versions["trained"]
    if _listed(server).get("tiny:prod", {}).get("llmc_version") != trained:
        promoted = _llmc(server, "promote", f"{PROMOTED_MODEL}@{trained}")
        assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-3000:]
    recipe = tmp_path / "pipeline.yaml"
    recipe.write_text(json.dumps({"kind": "pipeline", "name": "promote-pipeline", "stages": [
        {"name": "sft", "recipe": "workloads/configs/tiny-lora.yaml",
         "set": ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "deepspeed.enabled=false",
                 "scaling.num_workers=1", f"run.register_as={PROMOTED_MODEL}"]},
        {"name": "promote", "recipe": {"kind": "promote", "version": "${stages.sft.outputs.registered_version}"}}]}))
    started = time.monotonic()
    result = run_llmc("pipeline", str(recipe), "--output-dir", str(tmp_path / "run"), "--address",
                      ray_cluster.address, timeout=900, env={GATE_KEY_ENV: server.key, "LLMC_MLFLOW": "on",
                                                            "MLFLOW_TRACKING_URI": server.registry_uri})
    print(f"pipeline with a promote stage: exit {result.returncode} in {time.monotonic() - started:.1f} s")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    made = json.loads((tmp_path / "run" / "sft" / "summary.json").read_text())["registered_version"]
    assert "[llmc] promote: running promote" in result.stdout
    assert re.search(rf"{made} refused: accuracy = [0-9.e-]+ against champion {PROMOTED_MODEL}@{trained}'s "
                     rf"[0-9.e-]+", result.stderr), result.stderr[-3000:]
    version = registry.version(server.registry_uri, *made.split("@"))
    assert registry.PARENT not in version.tags  # trained from the base model
    assert f"llmc.gate.{PROMOTED_MODEL}/v{version.version}.accuracy" in version.tags
    assert str(registry.candidate(server.registry_uri, PROMOTED_MODEL).version) == str(version.version)
    assert str(registry.champion(server.registry_uri, PROMOTED_MODEL).version) == trained
    assert _listed(server)["tiny:prod"]["llmc_version"] == trained

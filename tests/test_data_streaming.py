"""The streaming data path (`data.streaming`): Ray Data reads, checks and tokenizes the rows on the cluster and each
Ray Train worker streams its own shard. The row -> tokens steps are checked in-process against the driver path's;
the shards, on the session's Ray cluster with real Ray Train workers; a LoRA run through the path must learn; a run
whose worker is killed mid-epoch resumes on exactly the uninterrupted run's examples; data larger than the object
store of a Ray started with the smallest one streams to the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from workloads.common.recipe import RecipeError
from workloads.data import pipeline, stream
from workloads.data.check import check_heads
from workloads.data.formats import pack, tokenize_examples, write_jsonl
from workloads.data.plan import data_plan
from workloads.data.recipe import DataConfig
from workloads.kinds import load_recipe

TINY = REPO / "workloads/configs/tiny-lora.yaml"


def _rows(n: int) -> list[dict]:
    """Alpaca rows whose tokens tell them apart (each has its own numbers)."""
    return [{"instruction": f"What is {i} plus {i + 7}?", "output": f"The sum of {i} and {i + 7} is {2 * i + 7}."}
            for i in range(n)]


def _config(path: Path, **fields) -> DataConfig:
    streaming = {"enabled": True, "max_cpus": 2, **fields.pop("streaming", {})}  # this machine's cores
    return DataConfig.model_validate({"path": str(path), "format": "alpaca", "max_length": 64, "eval_fraction": 0.25,
                                      "streaming": streaming, **fields})


def test_the_eval_split_is_a_seeded_hash_of_the_row():
    rows = _rows(4000)
    picked = [stream.held_out(r, "alpaca", 7, 0.25) for r in rows]
    assert picked == [stream.held_out(r, "alpaca", 7, 0.25) for r in rows]  # the same on every pass
    assert 0.22 < sum(picked) / len(rows) < 0.28
    assert picked != [stream.held_out(r, "alpaca", 8, 0.25) for r in rows]  # the seed decides
    assert not any(stream.held_out(r, "alpaca", 7, 0.0) for r in rows)
    extra = [{**r, "source": "x"} for r in rows]  # columns the format does not read do not move a row
    assert picked == [stream.held_out(r, "alpaca", 7, 0.25) for r in extra]


def test_streamed_examples_are_the_driver_paths_token_for_token(tiny_model_dir, tmp_path):
    from workloads.models.loading import load_tokenizer

    cfg = _config(write_jsonl(_rows(40), tmp_path / "rows.jsonl"), packing=True)
    (_, source), args = cfg.sources()[0], (str(tiny_model_dir), None, None)
    tokenizer = load_tokenizer(*args)
    train = stream.examples(_rows(40), cfg, source, "data.path", "rows.jsonl", seed=3, eval_split=False,
                            tokenizer_args=args)
    kept = [r for r in _rows(40) if not stream.held_out(r, "alpaca", 3, 0.25)]
    assert train == tokenize_examples(kept, "alpaca", cfg, tokenizer) and 0 < len(train) < 40
    assert stream.packed(train, cfg.max_length) == pack(train, cfg.max_length)


def test_a_bad_row_while_streaming_names_the_field_the_dataset_and_the_row():
    cfg = DataConfig.model_validate({"path": str(REPO / "workloads/bundled/arithmetic_train.jsonl"),
                                     "format": "alpaca", "columns": {"output": "answer"}})
    _, source = cfg.sources()[0]
    rows = [{"instruction": "2 + 2?", "answer": "4"}, {"instruction": "3 + 3?", "reply": "6"}]
    with pytest.raises(RecipeError) as info:
        stream.checked_rows(rows, source, "data.path", "train.jsonl")
    said = str(info.value)
    assert "field 'data.path': train.jsonl cannot be used as format 'alpaca'" in said, said
    assert '"reply": "6"' in said and "column 'answer' (mapped to 'output') is missing" in said, said


def test_the_driver_refuses_a_broken_large_file_from_its_first_rows(tmp_path):
    rows = _rows(200_000)
    rows[2] = {"instruction": "no answer here"}
    path = write_jsonl(rows, tmp_path / "big.jsonl")
    started = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        check_heads(_config(path))
    assert time.perf_counter() - started < 2.0  # the first check_rows rows only, not the 200,000
    assert "field 'data.path'" in str(info.value) and "line 3: field 'output' is missing" in str(info.value)
    reports = check_heads(_config(write_jsonl(_rows(5000), tmp_path / "ok.jsonl"), streaming={"check_rows": 100}))
    assert [r.rows for r in reports] == [100]


def test_validate_prints_the_data_plan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(_rows(30_000), tmp_path / "big.jsonl")  # larger than the 1 MiB sample: estimated
    pq.write_table(pa.Table.from_pylist(_rows(1234)), tmp_path / "part.parquet")
    cfg = DataConfig.model_validate({"format": "alpaca", "streaming": {"enabled": True}, "datasets": [
        {"path": str(jsonl)}, {"data_files": [str(tmp_path / "*.parquet")]}]})
    plan = data_plan(cfg)
    big, part = plan["sources"]
    assert big["field"] == "data.datasets.0.path" and big["reader"] == "json" and big["files"] == 1
    assert abs(big["estimated_rows"] - 30_000) < 1500, big  # from the first MiB (shorter rows: a little high)
    assert part["estimated_rows"] == 1234 and part["estimate"].startswith("exact")
    assert plan["streaming"] and "Ray Data" in plan["tokenization"] and plan["estimated_rows"] == sum(
        s["estimated_rows"] for s in plan["sources"])
    from workloads.finetune.plan import validation_plan

    shown = validation_plan(load_recipe(TINY, ["data.streaming.enabled=true"]))
    assert shown["data_plan"]["sources"][0]["estimated_rows"] == 4000 and "data_rows_checked" in shown
    assert "driver" in validation_plan(load_recipe(TINY))["data_plan"]["tokenization"]


def test_a_cached_count_is_keyed_by_the_data_the_seed_and_the_tokenizer(tiny_model_dir, tmp_path):
    path = write_jsonl(_rows(40), tmp_path / "rows.jsonl")
    args = (str(tiny_model_dir), None, None)
    key = pipeline.count_key(_config(path), 5, args)
    assert key == pipeline.count_key(_config(path, streaming={"shuffle_buffer_rows": 7, "check_rows": 3}), 5, args)
    others = [pipeline.count_key(_config(path), 6, args), pipeline.count_key(_config(path, max_length=32), 5, args),
              pipeline.count_key(_config(path), 5, (str(tiny_model_dir), None, "{{ messages }}"))]
    assert len({key, *others}) == 4
    write_jsonl(_rows(41), path)  # the file changed: another key
    assert pipeline.count_key(_config(path), 5, args) not in (key, None)
    hub = DataConfig.model_validate({"hub": "org/name", "format": "alpaca", "streaming": {"enabled": True}})
    assert pipeline.count_key(hub, 5, args) is None


# -- on the session's Ray cluster -------------------------------------------------------------------------------------


def shard_loop(config: dict) -> None:
    """A Train worker that records every example of one pass over its shard of each dataset, one row at a time."""
    from cluster import data as cluster_data
    from cluster import train as cluster_train

    rank, _, _ = cluster_train.world()
    for name in config["names"]:
        seen = [row for batch in cluster_data.shard_batches(name, 64, drop_last=False) for row in batch]
        Path(config["out"], f"{name}-rank{rank}.json").write_text(json.dumps(seen))


def _segments(example: dict) -> list[tuple[int, ...]]:
    """The examples a (packed) example holds, as token tuples: a packed block restarts position_ids at 0."""
    ids = example["input_ids"]
    starts = [i for i, p in enumerate(example.get("position_ids") or [0]) if p == 0] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_workers_stream_disjoint_shards_whose_union_is_the_train_split(ray_cluster, tiny_model_dir, tmp_path,
                                                                       workers):
    """One run of `workers` workers streams the same rows packed and unpacked (two datasets)."""
    import ray
    import ray.cloudpickle

    from cluster import train as cluster_train
    from workloads.models.loading import load_tokenizer

    ray.init(ignore_reinit_error=True, log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    rows, args = _rows(600), (str(tiny_model_dir), None, None)
    path = write_jsonl(rows, tmp_path / "rows.jsonl")
    configs = {name: _config(path, packing=packing, streaming={"batch_rows": 50})
               for name, packing in (("plain", False), ("packed", True))}
    streams = {name: pipeline.build(cfg, 5, args, count=name == "plain") for name, cfg in configs.items()}
    again = pipeline.build(configs["plain"], 5, args, count=True)  # the same data: its count is not streamed again
    assert (streams["plain"].counted, again.counted) == ("counted", "cached")
    assert again.train_examples == streams["plain"].train_examples
    assert {s.train.context.execution_options.resource_limits.cpu for s in streams.values()} == {2}  # max_cpus
    tokenizer = load_tokenizer(*args)
    ids = {tuple(tokenize_examples([r], "alpaca", configs["plain"], tokenizer)[0]["input_ids"]): i
           for i, r in enumerate(rows)}
    expected = {i for i, r in enumerate(rows) if not stream.held_out(r, "alpaca", 5, 0.25)}
    (tmp_path / "seen").mkdir()
    cluster_train.fit(shard_loop, {"out": str(tmp_path / "seen"), "names": list(streams)}, name=f"shards-{workers}",
                      storage_path=str(tmp_path / "storage"),
                      datasets={name: built.train for name, built in streams.items()},
                      scaling=cluster_train.WorkerScaling(num_workers=workers, resources_per_worker={"CPU": 1}))
    for name, packing in (("plain", False), ("packed", True)):
        seen = [json.loads((tmp_path / "seen" / f"{name}-rank{r}.json").read_text()) for r in range(workers)]
        assert len({len(shard) for shard in seen}) == 1, name  # every worker the same number of (packed) examples
        shards = [[ids[segment] for example in shard for segment in _segments(example)] for shard in seen]
        union = set().union(*map(set, shards))
        assert sum(map(len, shards)) == len(union), name  # no row twice, in one shard or across them
        assert union <= expected, name
        dropped = len(expected) - len(union)  # Ray Train's equal split drops fewer examples (blocks) than workers
        assert dropped == 0 if workers == 1 else dropped < (workers * 64 if packing else workers), (name, dropped)
        if name == "plain":  # the driver's count of a pass (counted for this one only: each count is a pass)
            assert 0 <= streams[name].train_examples - sum(map(len, seen)) < workers
        if packing:
            assert any(len(_segments(example)) > 1 for example in seen[0])


@pytest.mark.slow
def test_a_lora_run_through_the_streamed_path_lowers_the_loss(ray_cluster, tmp_path):
    from workloads.finetune import driver

    recipe = load_recipe(TINY, ["data.streaming.enabled=true", "data.streaming.max_cpus=2", "train.max_steps=24",
                                "train.eval_every=12", "train.checkpoint_every=12", "deepspeed.enabled=false",
                                "run.name=streamed-lora"])
    summary = driver.run(recipe, output_dir=str(tmp_path / "run"))
    assert summary["steps"] == 24 and (tmp_path / "run" / "adapter").is_dir()
    assert summary["final_train_loss"] < 0.7 * summary["initial_train_loss"], summary
    assert summary["final_eval_loss"] < summary["initial_eval_loss"], summary


def resume_loop(config: dict) -> None:
    """A Train worker that takes its streamed steps as the fine-tuning worker does (`StreamedSteps.after` the step of
    the newest checkpoint, the steps per epoch it recorded), records each step's examples and checkpoints every
    `every` steps. Rank 1 kills its own process (SIGKILL) once at each step of `kill_at`, after recording it."""
    import os
    import signal
    import tempfile

    from cluster import train as cluster_train
    from workloads.finetune.recipe import FinetuneRecipe
    from workloads.finetune.worker import StreamedSteps

    recipe, out = FinetuneRecipe.model_validate(config["recipe"]), Path(config["out"])
    rank, _, _ = cluster_train.world()
    with cluster_train.latest_checkpoint() as checkpoint:
        state = json.loads((checkpoint / "state.json").read_text()) if checkpoint else {"step": 0}
    batches = StreamedSteps(recipe, 0, None)  # as with max_steps: the steps per epoch are learned from a pass
    steps = batches.after(state["step"], state.get("steps_per_epoch"))
    for step in range(state["step"] + 1, config["total"] + 1):
        examples = [ids[mask.bool()].tolist() for micro in next(steps)
                    for ids, mask in zip(micro["input_ids"], micro["attention_mask"], strict=True)]
        with (out / f"rank{rank}.jsonl").open("a") as log:
            log.write(json.dumps({"step": step, "examples": examples}) + "\n")
        if rank == 1 and step in config["kill_at"] and not (out / f"killed-{step}").exists():
            _wait_for_registered(Path(config["snapshot"]), step - step % config["every"])
            (out / f"killed-{step}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        if step % config["every"] == 0:
            with tempfile.TemporaryDirectory() as saved:
                if rank == 0:
                    Path(saved, "state.json").write_text(json.dumps({"step": step,
                                                                     "steps_per_epoch": batches.steps_per_epoch}))
                cluster_train.report({"step": step}, saved if rank == 0 else None)


def _wait_for_registered(snapshot: Path, step: int) -> None:
    """Until Ray Train has registered the checkpoint of `step` (its snapshot names it), so a restart resumes there."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"] == step:
                return
        except (OSError, ValueError, KeyError, TypeError):  # not written yet, caught mid-write, or none registered
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no checkpoint of step {step} registered in {snapshot}")


@pytest.mark.slow
def test_a_run_resumed_after_a_worker_is_killed_trains_on_the_uninterrupted_runs_examples(ray_cluster, tiny_model_dir,
                                                                                         tmp_path):
    """Two workers, 6 steps per epoch (96 rows each, 8 x 2 per step, a local shuffle buffer of 32), 14 steps with a
    checkpoint every 2: a worker killed at step 5 (epoch 1, before the steps per epoch are known) and at step 9 (epoch
    2) resumes from steps 4 and 8; every step, replayed or not, trains on the uninterrupted run's examples."""
    import ray
    import ray.cloudpickle

    from cluster import train as cluster_train

    ray.init(ignore_reinit_error=True, log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    path = write_jsonl(_rows(192), tmp_path / "rows.jsonl")
    recipe = load_recipe(TINY, [f"data.path={path}", "data.eval_path=null", "data.eval_fraction=0",
                                "data.streaming.enabled=true", "data.streaming.max_cpus=2",
                                "data.streaming.batch_rows=16",
                                "data.streaming.shuffle_buffer_rows=32", "train.micro_batch_size=8",
                                "train.gradient_accumulation_steps=2"])
    model = (str(tiny_model_dir), None, None)
    seen = {}
    for name, kill_at in (("whole", []), ("killed", [5, 9])):
        out = tmp_path / name
        out.mkdir()
        streams = pipeline.build(recipe.data, recipe.train.seed, model, count=False)
        snapshot = Path(cluster_train.experiment_path(str(tmp_path / "storage"), f"resume-{name}"),
                        "checkpoint_manager_snapshot.json")
        cluster_train.fit(resume_loop, {"recipe": recipe.model_dump(mode="json"), "out": str(out), "total": 14,
                                        "every": 2, "kill_at": kill_at, "snapshot": str(snapshot)},
                          name=f"resume-{name}", storage_path=str(tmp_path / "storage"),
                          datasets={"train": streams.train}, max_failures=2,
                          scaling=cluster_train.WorkerScaling(num_workers=2, resources_per_worker={"CPU": 1}))
        seen[name] = [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()]
                      for r in range(2)]
    whole = [{row["step"]: row["examples"] for row in rank} for rank in seen["whole"]]
    assert [sorted(steps) for steps in whole] == [list(range(1, 15))] * 2
    killed = [row["step"] for row in seen["killed"][1]]
    assert killed == [*range(1, 6), *range(5, 10), *range(9, 15)], killed  # resumed from steps 4 and 8
    for rank, rows in enumerate(seen["killed"]):  # the steps made before each kill, made again after it, the rest
        assert {row["step"] for row in rows} == set(range(1, 15))
        for row in rows:
            assert row["examples"] == whole[rank][row["step"]], (rank, row["step"])
    # the two workers' shards are disjoint, and each epoch is its own seeded order of the same shard
    epoch = [[sorted(map(tuple, sum((whole[r][s] for s in range(e * 6 + 1, e * 6 + 7)), []))) for r in range(2)]
             for e in range(2)]
    assert epoch[0] == epoch[1] and not set(epoch[0][0]) & set(epoch[0][1])
    assert whole[0][1] != whole[0][7]


# Run in a process of its own, on a Ray it starts with the smallest object store Ray allows (75 MiB, below the
# tokenized data): every worker streams its whole shard of one pass, as the fine-tuning worker reads it.
SMALL_STORE_RUN = """
import json, sys, time
import ray
from cluster import train as cluster_train
from workloads.data import pipeline
from workloads.kinds import load_recipe

def read_shard(config):
    from cluster import data as cluster_data
    from cluster import train as cluster_train
    examples = tokens = 0
    for rows in cluster_data.shard_batches("train", 64, drop_last=False):
        examples, tokens = examples + len(rows), tokens + sum(len(row["input_ids"]) for row in rows)
    cluster_train.report({"examples": examples, "tokens": tokens})
    with open(f"{config['out']}/rank{cluster_train.world()[0]}.json", "w") as handle:
        json.dump({"examples": examples, "tokens": tokens}, handle)

recipe_path, data, model, out = sys.argv[1:5]
started = time.perf_counter()
# Ray refuses to spill once the disk is 95% used, however much is free: CI's shared 252 GB disk once stood at 96% with
# 8 GB free and this run failed on OutOfDiskError. It spills about 100 MB, so only a truly full disk should stop it.
ray.init(address="local", num_cpus=4, object_store_memory=75 * 2**20, include_dashboard=False, log_to_driver=False,
         _system_config={"local_fs_capacity_threshold": 1.0})
recipe = load_recipe(recipe_path, [f"data.path={data}", "data.eval_path=null", "data.eval_fraction=0",
                                   "data.max_length=512", "data.streaming.enabled=true",
                                   "data.streaming.max_cpus=2"])
streams = pipeline.build(recipe.data, recipe.train.seed, (model, None, None), count=False)
cluster_train.fit(read_shard, {"out": out}, name="small-store", storage_path=f"{out}/storage",
                  datasets={"train": streams.train},
                  scaling=cluster_train.WorkerScaling(num_workers=2, resources_per_worker={"CPU": 1}))
print(json.dumps({"store": ray.cluster_resources()["object_store_memory"], "seconds": time.perf_counter() - started}))
"""


@pytest.mark.slow
def test_data_larger_than_the_object_store_streams_to_the_end(tiny_model_dir, tmp_path):
    """28,000 examples of about 215 tokens: about 95 MB as the int64 input_ids and labels the pipeline's blocks hold,
    more than the 75 MiB object store of the Ray this test starts. Both workers stream their whole shard."""
    rows = [{"instruction": f"Row {i}: " + " ".join(f"w{(i * 7 + k) % 997}" for k in range(50)), "output": f"ok {i}"}
            for i in range(28_000)]
    data = write_jsonl(rows, tmp_path / "big.jsonl")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", SMALL_STORE_RUN, str(TINY), str(data), str(tiny_model_dir),
                           str(tmp_path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    run = json.loads(done.stdout.strip().splitlines()[-1])
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen[0]["examples"] == seen[1]["examples"] and 28_000 - 2 < sum(s["examples"] for s in seen) <= 28_000
    tokenized = 16 * sum(s["tokens"] for s in seen)  # int64 input_ids and labels
    assert tokenized > 1.1 * run["store"], (tokenized, run)

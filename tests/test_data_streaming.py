"""The streaming data path (`data.streaming`): Ray Data reads, checks and tokenizes the rows on the cluster and each
Ray Train worker streams its own shard. The row -> tokens steps are checked in-process against the driver path's;
the shards, on the session's Ray cluster with real Ray Train workers; a LoRA run through the path must learn.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from workloads.common.recipe import RecipeError
from workloads.data import stream
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
    streaming = {"enabled": True, **fields.pop("streaming", {})}
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


# -- on the session's Ray cluster -------------------------------------------------------------------------------------


def shard_loop(config: dict) -> None:
    """A Train worker that records every example of one pass over its shard, one row at a time."""
    from cluster import data as cluster_data
    from cluster import train as cluster_train

    rank, _, _ = cluster_train.world()
    seen = [row for batch in cluster_data.shard_batches("train", 1) for row in batch]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(seen))


def _segments(example: dict) -> list[tuple[int, ...]]:
    """The examples a (packed) example holds, as token tuples: a packed block restarts position_ids at 0."""
    ids = example["input_ids"]
    starts = [i for i, p in enumerate(example.get("position_ids") or [0]) if p == 0] + [len(ids)]
    return [tuple(ids[a:b]) for a, b in zip(starts, starts[1:], strict=False)]


@pytest.mark.slow
@pytest.mark.parametrize("workers,packing", [(1, False), (2, False), (1, True), (2, True)])
def test_workers_stream_disjoint_shards_whose_union_is_the_train_split(ray_cluster, tiny_model_dir, tmp_path,
                                                                       workers, packing):
    import ray
    import ray.cloudpickle

    from cluster import train as cluster_train
    from workloads.data import pipeline
    from workloads.models.loading import load_tokenizer

    ray.init(ignore_reinit_error=True, log_to_driver=False)  # the session's cluster (RAY_ADDRESS)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    rows = _rows(600)
    cfg = _config(write_jsonl(rows, tmp_path / "rows.jsonl"), packing=packing, streaming={"batch_rows": 50})
    args = (str(tiny_model_dir), None, None)
    streams = pipeline.build(cfg, 5, args, count=True)
    tokenizer = load_tokenizer(*args)
    ids = {tuple(tokenize_examples([r], "alpaca", cfg, tokenizer)[0]["input_ids"]): i for i, r in enumerate(rows)}
    expected = {i for i, r in enumerate(rows) if not stream.held_out(r, "alpaca", 5, 0.25)}
    (tmp_path / "seen").mkdir()
    cluster_train.fit(shard_loop, {"out": str(tmp_path / "seen")}, name=f"shards-{workers}-{packing}",
                      storage_path=str(tmp_path / "storage"), datasets={"train": streams.train},
                      scaling=cluster_train.WorkerScaling(num_workers=workers, resources_per_worker={"CPU": 1}))
    seen = [json.loads((tmp_path / "seen" / f"rank{r}.json").read_text()) for r in range(workers)]
    assert len({len(shard) for shard in seen}) == 1  # every worker the same number of (packed) examples
    shards = [[ids[segment] for example in shard for segment in _segments(example)] for shard in seen]
    union = set().union(*map(set, shards))
    assert sum(map(len, shards)) == len(union)  # no row twice, in one shard or across them
    assert union <= expected
    dropped = len(expected) - len(union)  # Ray Train's equal split drops fewer examples (blocks) than workers
    assert dropped == 0 if workers == 1 else dropped < (workers * 64 if packing else workers), dropped
    assert 0 <= streams.train_examples - sum(map(len, seen)) < workers  # the driver's count of one pass
    if packing:
        assert any(len(_segments(example)) > 1 for example in seen[0])


@pytest.mark.slow
def test_a_lora_run_through_the_streamed_path_lowers_the_loss(ray_cluster, tmp_path):
    from workloads.finetune import driver

    recipe = load_recipe(TINY, ["data.streaming.enabled=true", "train.max_steps=24", "train.eval_every=12",
                                "train.checkpoint_every=12", "deepspeed.enabled=false", "run.name=streamed-lora"])
    summary = driver.run(recipe, output_dir=str(tmp_path / "run"))
    assert summary["steps"] == 24 and (tmp_path / "run" / "adapter").is_dir()
    assert summary["final_train_loss"] < 0.7 * summary["initial_train_loss"], summary
    assert summary["final_eval_loss"] < summary["initial_eval_loss"], summary

"""Experiment tracking from the recipe: what the trackers write is read back with each tool's own reader
(TensorBoard event records, MLflow's client on the file store); W&B offline when it is installed."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

from tests.conftest import REPO
from workloads.common import tracking
from workloads.kinds import load_recipe

TINY = REPO / "workloads/configs/tiny-lora.yaml"
ROWS = [{"step": 1, "loss": 2.0, "lr": 1e-3, "eval_loss": None},
        {"step": 2, "loss": 1.5, "lr": 1e-3, "eval_loss": 1.4, "eval_perplexity": 4.05, "eval_exact_match": 0.25},
        {"step": 3, "loss": 1.2, "lr": 1e-3, "stopped": True}]


def _recipe(*backends: str):
    return load_recipe(TINY, [f"tracking.backends=[{', '.join(backends)}]", "run.name=track-test"])


def _log(recipe, directory: Path, rows=ROWS, **kwargs) -> tracking.Tracker:
    tracker = tracking.open_tracker(recipe.tracking, directory, recipe.run.name, **kwargs)
    tracker.log_params(recipe.model_dump(mode="json"))
    for row in rows:
        tracker.log_metrics(row, row["step"])
    tracker.close()
    return tracker


def read_events(logdir: Path) -> list:
    """Every event record of a TensorBoard log dir, oldest file first (TFRecord framing, Event protos)."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[pos + 12 : pos + 12 + length])  # after length and its CRC
            events.append(event)
            pos += 12 + length + 4  # and the data's CRC
    return events


def scalars(events: list) -> dict[str, list[tuple[int, float]]]:
    found: dict[str, list[tuple[int, float]]] = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                found.setdefault(value.tag, []).append((event.step, round(value.simple_value, 4)))
    return found


def test_names_and_params_are_the_same_on_every_backend():
    assert tracking.metric_name("loss") == "train/loss"
    assert tracking.metric_name("eval_exact_match") == "eval/exact_match"
    flat = tracking.flatten({"train": {"lr": 0.1, "betas": [0.9, 0.99]}, "run": {"name": "x"}, "none": None})
    assert flat == {"train.lr": "0.1", "train.betas": "[0.9, 0.99]", "run.name": "x", "none": "null"}
    assert tracking.Tracker().ids == {}  # no backends: every call is a no-op
    tracking.Tracker().log_metrics({"loss": 1.0}, 1)


def test_tensorboard_events_hold_the_scalars_and_the_recipe(tmp_path):
    recipe = _recipe("tensorboard")
    _log(recipe, tmp_path)
    logdir = tmp_path / "tensorboard" / "track-test"
    found = scalars(read_events(logdir))
    assert found["train/loss"] == [(1, 2.0), (2, 1.5), (3, 1.2)]
    assert found["eval/loss"] == [(2, 1.4)] and found["eval/exact_match"] == [(2, 0.25)]
    assert "train/step" not in found and "train/stopped" not in found  # the x axis and non-numbers are not scalars
    texts = [v for e in read_events(logdir) for v in e.summary.value if v.tag.startswith("recipe")]
    assert texts and b"train.method" in texts[0].tensor.string_val[0]
    assert tracking.locations(recipe.tracking, tmp_path, "track-test") == {"tensorboard": str(logdir)}


def test_tensorboard_restart_purges_the_steps_trained_again(tmp_path):
    recipe = _recipe("tensorboard")
    _log(recipe, tmp_path)
    _log(recipe, tmp_path, rows=[{"step": 3, "loss": 1.1}], start_step=2)  # a restart from the step-2 checkpoint
    events = read_events(tmp_path / "tensorboard" / "track-test")
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [3]  # TensorBoard drops what was logged from step 3 on before this marker
    assert scalars(events)["train/loss"][-1] == (3, 1.1)


def test_mlflow_run_reads_back_from_the_file_store_and_a_restart_continues_it(tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = _recipe("mlflow")
    first = _log(recipe, tmp_path)
    uri = tracking.locations(recipe.tracking, tmp_path, "track-test")["mlflow"]
    assert uri.startswith("file:") and (tmp_path / "mlruns").is_dir()
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(first.ids["mlflow"])
    assert run.info.run_name == "track-test" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "llmc"
    assert run.data.params["train.method"] == "lora" and run.data.params["tracking.backends"] == '["mlflow"]'
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (1, 2.0), (2, 1.5), (3, 1.2)]
    assert run.data.metrics["eval/perplexity"] == 4.05

    longer = load_recipe(TINY, ["tracking.backends=[mlflow]", "run.name=track-test", "train.max_steps=80"])
    again = _log(longer, tmp_path, rows=[{"step": 4, "loss": 1.0}], resume_ids=first.ids)  # resumed, longer
    assert again.ids == first.ids  # the same run, continued; its params stay those it was started with
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3, 4]
    assert client.get_run(run.info.run_id).data.params["train.max_steps"] == "60"
    with pytest.raises(RuntimeError), tracking.open_tracker(recipe.tracking, tmp_path, "crashes") as crashing:
        raise RuntimeError("a worker error")
    assert client.get_run(crashing.ids["mlflow"]).info.status == "FAILED"
    elsewhere = _log(recipe, tmp_path / "other", resume_ids=first.ids)  # that run is not in this store: a new one
    assert elsewhere.ids["mlflow"] != first.ids["mlflow"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (optional)")
def test_wandb_logs_offline_under_the_tracking_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    tracker = _log(_recipe("wandb"), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and tracker.ids["wandb"] in runs[0].name
    assert list(runs[0].glob("run-*.wandb"))

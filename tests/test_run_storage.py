"""A new run never silently deletes an earlier run's checkpoints in `run.storage_path/run.name`: another run directory
with the same run name and storage is refused, naming the location, before any cluster work (local and s3://)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from workloads.align.run import run as align
from workloads.common.recipe import RecipeError
from workloads.finetune.driver import refuse_to_replace
from workloads.finetune.driver import run as finetune
from workloads.kinds import load_recipe
from workloads.serve.objectstore import LocalS3

LORA = REPO / "workloads/configs/tiny-lora.yaml"
GRPO = REPO / "workloads/configs/tiny-grpo.yaml"


def _earlier_run(storage: Path, name: str) -> dict[str, bytes]:
    """`storage/name` as a finished run leaves it (Ray Train's snapshot, a checkpoint); returns its files' bytes."""
    run = storage / name
    (run / "checkpoint_2026-12-06_10-00-00.000000" / "state").mkdir(parents=True)
    (run / "checkpoint_2026-12-06_10-00-00.000000" / "state" / "trainer.pt").write_bytes(b"earlier weights")
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps({"checkpoints": 1}))
    return _files(run)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_second_run_directory_cannot_delete_the_first_runs_checkpoints(tmp_path):
    storage = tmp_path / "shared"
    before = _earlier_run(storage, "tiny-lora")
    second = tmp_path / "B"
    recipe = load_recipe(LORA, [f"run.storage_path={storage}"])
    with pytest.raises(RecipeError) as refused:  # llmc's exit 2, as every refused recipe (tests/test_config.py)
        finetune(recipe, output_dir=str(second))
    said = str(refused.value)
    assert f"field 'run.storage_path': {storage}/tiny-lora already holds checkpoints of an earlier run" in said
    assert "--overwrite" in said and "run.resume_from=latest" in said
    assert _files(storage / "tiny-lora") == before and not second.exists()  # refused before anything was written

    # llmc align (PPO and GRPO clear the same place) is refused alike, before it reads its prompts.
    grpo = load_recipe(GRPO, [f"run.storage_path={storage}", "run.name=tiny-lora"])
    with pytest.raises(RecipeError, match=f"{storage}/tiny-lora already holds checkpoints"):
        align(grpo, output_dir=str(tmp_path / "C"))
    assert _files(storage / "tiny-lora") == before

    refuse_to_replace(second, recipe.run, overwrite=True)  # --overwrite: the run goes on (and replaces them)
    latest = load_recipe(LORA, [f"run.storage_path={storage}", "run.resume_from=latest"])
    refuse_to_replace(second, latest.run, overwrite=False)  # continuing that run keeps its checkpoints
    other = load_recipe(LORA, [f"run.storage_path={storage}", "run.name=another"])
    refuse_to_replace(second, other.run, overwrite=False)  # nothing stored under that name
    inside = storage / "tiny-lora" / "checkpoint_2026-12-06_10-00-00.000000"
    explicit = load_recipe(LORA, [f"run.storage_path={storage}", f"run.resume_from={inside}"])
    refuse_to_replace(second, explicit.run, overwrite=False)  # a checkpoint of that run: it is continued
    (tmp_path / "elsewhere").mkdir()
    elsewhere = load_recipe(LORA, [f"run.storage_path={storage}", f"run.resume_from={tmp_path / 'elsewhere'}"])
    with pytest.raises(RecipeError, match=f"{storage}/tiny-lora already holds checkpoints"):
        refuse_to_replace(second, elsewhere.run, overwrite=False)  # another start would still delete them


def test_an_s3_storage_holding_an_earlier_run_is_refused(tmp_path, monkeypatch):
    with LocalS3() as s3:
        for key, value in s3.endpoint.env().items():
            monkeypatch.setenv(key, value)
        client = s3.endpoint.client()
        client.create_bucket(Bucket="runs")
        client.put_object(Bucket="runs", Key="ckpt/tiny-lora/checkpoint_000001/state.json", Body=b"{}")
        recipe = load_recipe(LORA, ["run.storage_path=s3://runs/ckpt"])
        with pytest.raises(RecipeError, match="s3://runs/ckpt/tiny-lora already holds checkpoints of an earlier run "
                                              r"named 'tiny-lora' \(checkpoint_000001\)"):
            refuse_to_replace(tmp_path / "B", recipe.run, overwrite=False)
        refuse_to_replace(tmp_path / "B", recipe.run, overwrite=True)
        for fresh in ("run.name=another", "run.storage_path=s3://nobucket/ckpt"):  # nothing there, or no bucket
            refuse_to_replace(tmp_path / "B", load_recipe(LORA, ["run.storage_path=s3://runs/ckpt", fresh]).run,
                              overwrite=False)
        assert [o["Key"] for o in client.list_objects_v2(Bucket="runs")["Contents"]] == [
            "ckpt/tiny-lora/checkpoint_000001/state.json"]

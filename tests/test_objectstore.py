"""The adapter store: credentials only where they belong, no links followed, no loopback store for remote nodes."""

from __future__ import annotations

import os

import pytest

from tests.conftest import REPO
from workloads.common.recipe import RecipeError
from workloads.kinds import load_recipe
from workloads.serve.deploy import check_before_start
from workloads.serve.objectstore import LocalS3, S3Endpoint, split_uri, upload_adapter

SERVE = REPO / "workloads/configs/serve-tiny.yaml"


def adapter_dir(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return folder


def test_placeholder_credentials_go_only_to_the_local_endpoint():
    assert "AWS_ACCESS_KEY_ID" in S3Endpoint("http://127.0.0.1:9000", local=True).env()
    remote = S3Endpoint("https://minio.example.internal").env()
    assert remote == {"AWS_ENDPOINT_URL": "https://minio.example.internal",
                      "AWS_ENDPOINT_URL_S3": "https://minio.example.internal"}
    assert S3Endpoint(None).env() == {}


def test_upload_refuses_a_symlink_that_could_carry_files_from_outside(tmp_path):
    folder = adapter_dir(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an adapter file")
    (folder / "extra.txt").symlink_to(secret)
    with LocalS3() as s3:
        with pytest.raises(ValueError, match="extra.txt is a symbolic link"):
            upload_adapter(folder, "s3://adapters/a", s3.endpoint)
        (folder / "extra.txt").unlink()
        upload_adapter(folder, "s3://adapters/a", s3.endpoint)
        bucket, prefix = split_uri("s3://adapters/a")
        keys = [o["Key"] for o in s3.endpoint.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == [f"{prefix}/adapter_config.json", f"{prefix}/adapter_model.safetensors"]


def test_a_local_adapter_store_is_refused_for_a_remote_cluster(tmp_path):
    recipe = load_recipe(SERVE, [f"adapters.paths.arith={adapter_dir(tmp_path)}"])
    with pytest.raises(RecipeError, match="field 'adapters.endpoint_url'.*10.0.0.5:6379 cannot reach"):
        check_before_start(recipe, [], address="10.0.0.5:6379")
    with pytest.raises(RecipeError, match="field 'adapters.endpoint_url'"):
        check_before_start(recipe, [], address="http://head.example:8265")
    assert set(check_before_start(recipe, [], address="127.0.0.1:6379")) == {"arith"}
    previous = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert set(check_before_start(recipe, [])) == {"arith"}  # embedded Ray: one machine
    finally:
        if previous is not None:
            os.environ["RAY_ADDRESS"] = previous


def test_an_adapter_above_the_engines_lora_rank_is_refused_before_start(tmp_path):
    recipe = load_recipe(SERVE, [f"adapters.paths.arith={adapter_dir(tmp_path)}", "adapters.max_lora_rank=4"])
    with pytest.raises(RecipeError, match="adapters.max_lora_rank.*'arith' has rank 8, above max_lora_rank 4"):
        check_before_start(recipe, [], address="127.0.0.1:6379")


@pytest.mark.parametrize("name", [".", ".."])
def test_adapter_and_run_names_cannot_be_dot_paths(tmp_path, name):
    with pytest.raises(RecipeError, match="adapters.paths"):
        load_recipe(SERVE, [f"adapters.paths.{name}={adapter_dir(tmp_path)}"])
    with pytest.raises(RecipeError, match="run.name"):
        load_recipe(REPO / "workloads/configs/tiny-lora.yaml", [f"run.name={name}"])


def test_short_api_keys_are_refused_and_the_key_variable_leaves_the_environment(monkeypatch):
    from workloads.serve.deploy import api_keys

    recipe = load_recipe(SERVE, ["adapters.enabled=false"])
    monkeypatch.setenv("LLMC_API_KEYS", "short-key, " + "k" * 40)
    keys = api_keys(recipe)
    assert keys == ["short-key", "k" * 40] and "LLMC_API_KEYS" not in os.environ  # Ray's processes never see it
    with pytest.raises(RecipeError, match=r"field 'server.api_keys': 1 key\(s\) .* shorter than 32 characters \(9\)"):
        check_before_start(recipe, keys)
    assert check_before_start(recipe, ["k" * 40]) == {}


def test_publishing_to_a_running_deployment_uploads_under_its_name_and_checks_the_rank(tmp_path):
    from workloads.serve.deploy import Served

    folder = adapter_dir(tmp_path)
    with LocalS3() as s3:
        served = Served("http://127.0.0.1:9/v1", "smollm2", "s3://published/smollm2", s3.endpoint, 16)
        assert served.publish("sentiment", folder) == "smollm2:sentiment"
        keys = [o["Key"] for o in s3.endpoint.client().list_objects_v2(Bucket="published")["Contents"]]
        assert sorted(keys) == ["smollm2/sentiment/adapter_config.json", "smollm2/sentiment/adapter_model.safetensors"]
        with pytest.raises(RecipeError, match="adapters.max_lora_rank.*'wide' has rank 8"):
            Served("http://127.0.0.1:9/v1", "smollm2", "s3://published/smollm2", s3.endpoint, 4).publish("wide", folder)
    with pytest.raises(RecipeError, match="adapters.enabled"):
        Served("http://127.0.0.1:9/v1", "smollm2", None, None, 16).publish("sentiment", folder)

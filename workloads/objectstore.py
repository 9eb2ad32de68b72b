"""Object storage for LoRA adapters: upload a run's adapter under `s3://BUCKET/PREFIX/NAME/`.

Ray Serve LLM loads adapters only from object-store URIs, and a multi-node cluster needs shared
storage anyway, so the laptop mirrors the cluster: `LocalS3` runs an S3-compatible endpoint (moto)
on 127.0.0.1 for as long as the serving driver lives, and `s3_env` tells every process where it is.
"""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

# moto accepts any credentials; these only have to be present.
_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "llmc-local", "AWS_SECRET_ACCESS_KEY": "llmc-local"}
REGION = "us-east-1"


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


def s3_env(endpoint_url: str | None) -> dict[str, str]:
    """Environment for boto3 and pyarrow (Ray Serve LLM's loader) to reach `endpoint_url`."""
    if endpoint_url is None:
        return {}  # the provider's own endpoint and the node's credentials
    return {"AWS_ENDPOINT_URL": endpoint_url, "AWS_ENDPOINT_URL_S3": endpoint_url,
            "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION, **_DUMMY_CREDENTIALS}


class LocalS3:
    """An S3-compatible endpoint (moto) on 127.0.0.1, in a thread of this process: `with LocalS3() as s3:`."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server = None

    def __enter__(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def upload_adapter(adapter_dir: Path, uri: str, endpoint_url: str | None) -> str:
    """Copy a PEFT adapter directory to `uri` (a folder); returns the URI. Creates the bucket if needed."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    client = _client(endpoint_url)
    bucket, prefix = split_uri(uri)
    _ensure_bucket(client, bucket)
    for path in sorted(p for p in adapter_dir.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(adapter_dir).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def ensure_prefix(uri: str, endpoint_url: str | None) -> None:
    """Create the bucket and an empty folder at `uri`: an empty adapter store must exist, or listing it fails."""
    client = _client(endpoint_url)
    bucket, prefix = split_uri(uri)
    _ensure_bucket(client, bucket)
    client.put_object(Bucket=bucket, Key=f"{prefix}/.keep", Body=b"")


def _client(endpoint_url: str | None):
    import boto3

    env = s3_env(endpoint_url)
    kwargs = {"endpoint_url": endpoint_url, "region_name": REGION} if endpoint_url else {}
    if endpoint_url:
        kwargs.update(aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    return boto3.client("s3", **kwargs)


def _ensure_bucket(client, bucket: str) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

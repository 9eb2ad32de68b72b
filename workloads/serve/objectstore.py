"""Object storage for LoRA adapters: upload a run's adapter under `s3://BUCKET/PREFIX/NAME/`.

Ray Serve LLM loads adapters only from object-store URIs, and a multi-node cluster needs shared
storage anyway, so the laptop mirrors the cluster: `LocalS3` runs an S3-compatible endpoint (moto)
on 127.0.0.1 for as long as the serving driver lives, and `s3_env` tells every process where it is.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# moto accepts any credentials; these only have to be present. Never sent to any other endpoint.
_LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "llmc-local", "AWS_SECRET_ACCESS_KEY": "llmc-local"}
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Endpoint:
    """Where adapters live: a provider's default endpoint (url None), a custom one (MinIO, R2), or the local one.

    Only the local endpoint gets the placeholder credentials; any other uses the node's own (environment,
    profile or instance role), so a real endpoint never receives fake keys.
    """

    url: str | None = None
    local: bool = False

    def env(self) -> dict[str, str]:
        """Environment for boto3 and pyarrow (Ray Serve LLM's loader) to reach this endpoint."""
        if self.url is None:
            return {}
        env = {"AWS_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_S3": self.url}
        if self.local:
            env.update(AWS_DEFAULT_REGION=REGION, AWS_REGION=REGION, **_LOCAL_CREDENTIALS)
        return env

    def client(self):
        import boto3

        kwargs: dict = {"endpoint_url": self.url} if self.url else {}
        if self.local:
            kwargs.update(region_name=REGION, aws_access_key_id=_LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=_LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        return boto3.client("s3", **kwargs)


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"expected s3://BUCKET/PREFIX, got {uri!r}")
    return parsed.netloc, parsed.path.strip("/")


class LocalS3:
    """An S3-compatible endpoint (moto) in a thread of this process: `with LocalS3() as s3:`.

    It listens on 127.0.0.1 unless `host` names another address of this machine (one that other nodes of a
    cluster reach, as the two-node tests need); it takes any credentials, so it never listens on all interfaces.
    """

    def __init__(self, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port(host)
        self.endpoint_url = f"http://{host}:{self.port}"
        self.endpoint = S3Endpoint(self.endpoint_url, local=True)
        self._server = None

    def __enter__(self) -> LocalS3:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


def adapter_files(adapter_dir: Path) -> list[Path]:
    """The files of an adapter directory, refusing any link: a symlink could carry files from outside it."""
    root = Path(adapter_dir)
    files = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"{path} is a symbolic link: adapters are uploaded only from regular files inside "
                             f"{root}")
        if path.is_file():
            files.append(path)
    return files


def upload_adapter(adapter_dir: Path, uri: str, endpoint: S3Endpoint) -> str:
    """Copy a PEFT adapter directory to `uri` (a folder); returns the URI. Creates the bucket if needed."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    files = adapter_files(adapter_dir)
    client = endpoint.client()
    bucket, prefix = split_uri(uri)
    _ensure_bucket(client, bucket)
    for path in files:
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(adapter_dir).as_posix()}")
    return f"s3://{bucket}/{prefix}"


def ensure_prefix(uri: str, endpoint: S3Endpoint) -> None:
    """Create the bucket and an empty folder at `uri`: an empty adapter store must exist, or listing it fails."""
    client = endpoint.client()
    bucket, prefix = split_uri(uri)
    _ensure_bucket(client, bucket)
    client.put_object(Bucket=bucket, Key=f"{prefix}/.keep", Body=b"")


def _ensure_bucket(client, bucket: str) -> None:
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` (an address of this machine) that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]

"""Ray 2.60 token authentication: find (or create) the cluster token and opt this process in before Ray loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def token_path() -> Path:
    """Where Ray reads and writes the token file: RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()


def auth_token() -> str | None:
    """The cluster token: RAY_AUTH_TOKEN, else the token file."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = token_path()
    return (path.read_text().strip() or None) if path.is_file() else None


def ensure_auth_token() -> str:
    """The token a local `ray start --head` needs; on a machine that never ran Ray, generate one.

    Ray 2.60's `ray start --head` exits 1 when no token exists (only `ray.init()` creates one itself),
    so create it the way Ray documents, `ray get-auth-token --generate`, which writes the token file.
    """
    token = auth_token()
    if token:
        return token
    ray_bin = Path(sys.executable).with_name("ray")
    done = subprocess.run([str(ray_bin), "get-auth-token", "--generate"], capture_output=True, text=True)
    token = auth_token()
    if token is None:
        raise RuntimeError(f"could not create a Ray auth token at {token_path()}: `ray get-auth-token --generate` "
                           f"exited {done.returncode}\n{done.stdout}{done.stderr}")
    return token


def enable_token_auth_if_available() -> None:
    """A head started with `ray start` rejects drivers and job clients without the token, and Ray
    reads RAY_AUTH_MODE once at import: so opt in here, before `ray` is imported, when a token exists."""
    if "RAY_AUTH_MODE" not in os.environ and auth_token():
        os.environ["RAY_AUTH_MODE"] = "token"

"""Ray 2.60 token authentication: find the cluster token and opt this process in before Ray loads."""

from __future__ import annotations

import os
from pathlib import Path


def auth_token() -> str | None:
    """The cluster token: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
    return (path.read_text().strip() or None) if path.is_file() else None


def enable_token_auth_if_available() -> None:
    """A head started with `ray start` rejects drivers and job clients without the token, and Ray
    reads RAY_AUTH_MODE once at import: so opt in here, before `ray` is imported, when a token exists."""
    if "RAY_AUTH_MODE" not in os.environ and auth_token():
        os.environ["RAY_AUTH_MODE"] = "token"

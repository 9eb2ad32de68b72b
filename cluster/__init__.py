"""The platform layer: the only package that imports Ray."""

from cluster.auth import enable_token_auth_if_available

enable_token_auth_if_available()

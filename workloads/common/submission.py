"""What `llmc submit` may send to a cluster: no secrets in the uploaded working dir, named variables forwarded.

The working dir is uploaded to the cluster (and kept in its object store): `.env` files and recipes that hold
API keys inline stay behind; secrets a job needs (e.g. `HF_TOKEN` for gated Llama weights) travel as named
environment variables of the job's runtime environment, whose values are never printed.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from workloads.common.recipe import RecipeError

# gitignore-style patterns Ray's working-dir upload understands.
SECRET_EXCLUDES = [".env", "**/.env", ".env.*", "**/.env.*", "*.pem", "**/*.pem"]
_SKIPPED_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", "node_modules"}


def recipe_holds_keys(data: object) -> bool:
    """True for a serve recipe with `server.api_keys` written inline."""
    return isinstance(data, dict) and isinstance(data.get("server"), dict) and bool(data["server"].get("api_keys"))


def files_with_inline_keys(working_dir: str | Path) -> list[str]:
    """YAML files under the working dir (relative paths) whose recipe holds API keys inline: never uploaded."""
    root = Path(working_dir).resolve()
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        for name in filenames:
            if not name.endswith((".yaml", ".yml")):
                continue
            path = Path(dirpath) / name
            try:
                data = yaml.safe_load(path.read_text(errors="replace"))
            except yaml.YAMLError:
                continue
            if recipe_holds_keys(data):
                found.append(path.relative_to(root).as_posix())
    return sorted(found)


def check_recipe_for_submission(recipe_path: str, overrides: list[str]) -> None:
    """A recipe with inline keys would put them in the job's files and metadata: refuse it, naming the field."""
    data = yaml.safe_load(Path(recipe_path).read_text()) if Path(recipe_path).is_file() else None
    if recipe_holds_keys(data) or any(o.split("=", 1)[0].startswith("server.api_keys") for o in overrides):
        raise RecipeError(f"field 'server.api_keys': {recipe_path} holds API keys inline, which `llmc submit` "
                          "would upload to the cluster: put them in the variable named by server.api_key_env on "
                          "the cluster instead")


def forwarded_env(names: list[str]) -> dict[str, str]:
    """Values of the named environment variables for the job; a name that is not set is an error (exit 2)."""
    missing = [n for n in names if n not in os.environ]
    if missing:
        raise RecipeError(f"--env / run.forward_env: {', '.join(missing)} not set in this environment")
    return {name: os.environ[name] for name in names}

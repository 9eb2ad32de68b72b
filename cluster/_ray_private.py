"""Every private Ray API this project relies on, in one place, checked against the Ray release it was written for.

Public APIs cover almost everything; these few have no public twin yet. Each access goes through here so a Ray
upgrade that renames one fails with a message naming it, not with an AttributeError deep inside a command.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import ray

WRITTEN_FOR = "2.60"  # the Ray minor version whose private names are used below
# Ray Train's hook on its trainer, called with the run's controller just before the driver waits on it.
TRAIN_CONTROLLER_HOOK = "_register_sigint_handler"


class RayPrivateApiError(RuntimeError):
    """A private Ray API this project uses is missing from the installed Ray."""


def _attribute(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise RayPrivateApiError(
            f"Ray {ray.__version__} has no {module}.{name} (llmcluster uses it as of Ray {WRITTEN_FOR}): "
            f"install ray=={WRITTEN_FOR}.* or update cluster/_ray_private.py"
        ) from exc


def stock_openai_app():
    """Ray Serve LLM's own FastAPI app for the OpenAI routes: its error handling, HTTP metrics, request ids."""
    return _attribute("ray.llm._internal.serve.core.ingress.ingress", "init")()


def model_card(model_id: str, llm_config) -> Any:
    """The `/v1/models` card Ray Serve LLM builds for a model from its LLMConfig."""
    return _attribute("ray.llm._internal.serve.core.configs.openai_api_models", "to_model_metadata")(
        model_id, llm_config)


def model_list_types() -> tuple[type, type]:
    """(ModelList, ModelCard): the response models of `/v1/models` and `/v1/models/{model}`."""
    module = "ray.llm._internal.serve.core.configs.openai_api_models"
    return _attribute(module, "ModelList"), _attribute(module, "ModelCard")


def serve_http_port() -> int | None:
    """The HTTP port of the Serve instance already running on the connected cluster, if any."""
    client = _attribute("ray.serve.context", "_get_global_client")(raise_if_no_controller_running=False)
    return client.http_config.port if client is not None else None


def require_train_controller_hook(trainer_cls: type) -> None:
    """The trainer subclass in `cluster.train` overrides Ray Train's hook: make sure Ray still calls it."""
    if not callable(getattr(trainer_cls.__mro__[1], TRAIN_CONTROLLER_HOOK, None)):
        raise RayPrivateApiError(f"Ray {ray.__version__}'s TorchTrainer has no {TRAIN_CONTROLLER_HOOK} (used as of "
                                 f"Ray {WRITTEN_FOR} to stop a run cleanly): update cluster/_ray_private.py")


_UNWANTED_DRIVER_MESSAGES: list[Callable[[str], bool]] = []


def drop_driver_messages(unwanted: Callable[[str], bool]) -> None:
    """The messages the raylet pushes to every driver (printed to stdout whatever `log_to_driver` says), less the
    lines `unwanted` picks; the raylet's own log keeps them all."""
    worker = importlib.import_module("ray._private.worker")
    printer = _attribute("ray._private.worker", "print_to_stdstream")
    if unwanted not in _UNWANTED_DRIVER_MESSAGES:
        _UNWANTED_DRIVER_MESSAGES.append(unwanted)
    if getattr(printer, "llmc_filtered", False):
        return

    def filtered(data: dict, ignore_prefix: bool) -> None:
        lines = [line for line in data.get("lines", []) if not any(f(line) for f in _UNWANTED_DRIVER_MESSAGES)]
        if lines:
            printer({**data, "lines": lines}, ignore_prefix=ignore_prefix)

    filtered.llmc_filtered = True
    worker.print_to_stdstream = filtered

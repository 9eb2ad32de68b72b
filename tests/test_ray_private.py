"""Private Ray APIs stay in one module: each resolves on the installed Ray, and a missing one says what it was."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster import _ray_private

REPO = Path(__file__).resolve().parent.parent


def test_every_private_api_resolves_on_the_installed_ray():
    model_list, model_card = _ray_private.model_list_types()
    assert model_list.__name__ == "ModelList" and model_card.__name__ == "ModelCard"
    assert callable(_ray_private._attribute("ray.llm._internal.serve.core.ingress.ingress", "init"))
    from cluster.train import _StoppableTrainer

    _ray_private.require_train_controller_hook(_StoppableTrainer)


def test_a_missing_private_api_is_named_with_the_ray_version_it_was_written_for():
    with pytest.raises(_ray_private.RayPrivateApiError, match=r"ray\.serve\.context\.no_such_thing .*Ray 2\.60"):
        _ray_private._attribute("ray.serve.context", "no_such_thing")


def test_no_other_module_reaches_into_rays_private_packages():
    pattern = re.compile(r"ray\.(_private|_internal|llm\._internal)|ray\.\w+(\.\w+)*\._[a-z]\w*\(")
    offenders = [f"{path.relative_to(REPO)}:{n}" for folder in ("cluster", "workloads")
                 for path in (REPO / folder).rglob("*.py") if path.name != "_ray_private.py"
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


def test_the_raylets_worker_pool_note_is_kept_from_the_terminal_and_its_other_messages_are_not(capsys):
    """Ray prints what the raylet pushes to a driver whatever `log_to_driver` says; without --verbose, `connect`
    drops its note on how many worker processes it started (2 cores, many at once: every run on a laptop)."""
    import importlib

    from cluster import runtime

    _ray_private.drop_driver_messages(runtime._worker_pool_note)
    printer = importlib.import_module("ray._private.worker").print_to_stdstream
    note = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 10.0.0.1, which is 4x "
            "the maximum expected startup concurrency (2).")
    printer({"lines": [note], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    printer({"lines": [note, "A worker died or was killed while executing a task."], "pid": "raylet",
             "is_err": False}, ignore_prefix=False)
    shown = capsys.readouterr().out
    assert "worker processes have been started" not in shown and shown.count("A worker died or was killed") == 1

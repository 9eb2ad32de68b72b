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

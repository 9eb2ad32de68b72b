"""The package layout: one table of recipe kinds (workloads.kinds) that every schema, runner and plan resolves from,
the commands `llmc` offers for them, and the user-facing paths kept after the move (no Ray is started)."""

from __future__ import annotations

import typing

import workloads.answers
import workloads.scoring
from tests.conftest import REPO
from workloads.cli import COMMANDS
from workloads.common.recipe import StrictModel
from workloads.kinds import KINDS, kinds
from workloads.scoring import answers


def test_every_kind_resolves_its_schema_runner_and_plan():
    assert [name for name, _ in kinds()] == list(KINDS)
    for name, kind in KINDS.items():
        assert issubclass(kind.schema, StrictModel)
        assert typing.get_args(kind.schema.model_fields["kind"].annotation) == (name,)  # the schema is this kind's
        assert callable(kind.runner) and kind.runner.__name__ == "run"
        assert kind.command in COMMANDS


def test_user_facing_paths_still_import():
    """Recipes and user code name `workloads.scoring` and `workloads.answers` (`module:function` rewards, scorers)."""
    assert workloads.answers.final_number is answers.final_number
    assert {"exact", "numeric", "final_number"} <= set(workloads.scoring.SCORERS)


def test_workloads_top_level_holds_only_the_entry_points():
    loose = sorted(p.name for p in (REPO / "workloads").glob("*.py"))
    assert loose == ["__init__.py", "answers.py", "cli.py", "demo.py", "kinds.py"]

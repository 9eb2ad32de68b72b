"""Checkpoints are checked against the SHA-256 manifests written at save time, before anything unpickles them."""

from __future__ import annotations

import pytest

from workloads.finetune.strategy import CheckpointIntegrityError, verify_manifest, write_manifest


def saved(tmp_path):
    """Two ranks' files merged into one state dir, as Ray Train merges the ranks' checkpoint dirs."""
    state = tmp_path / "state"
    for rank in (0, 1):
        own = tmp_path / f"rank{rank}" / "state"
        (own / "state").mkdir(parents=True)
        (own / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank]) * 64)
        if rank == 0:
            (own / "latest").write_text("state")
        write_manifest(own, rank)
        for path in own.rglob("*"):
            if path.is_file():
                target = state / path.relative_to(own)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(path.read_bytes())
    return state


def test_an_untouched_checkpoint_verifies(tmp_path):
    verify_manifest(saved(tmp_path))


def test_a_changed_added_or_missing_file_is_refused_by_name(tmp_path):
    state = saved(tmp_path)
    (state / "state" / "zero_pp_rank_1_optim_states.pt").write_bytes(b"pickled payload")
    (state / "state" / "extra.pt").write_bytes(b"x")
    (state / "latest").unlink()
    with pytest.raises(CheckpointIntegrityError) as err:
        verify_manifest(state)
    message = str(err.value)
    assert "state/zero_pp_rank_1_optim_states.pt: SHA-256 differs" in message
    assert "state/extra.pt: not in any manifest" in message and "latest: listed but missing" in message


def test_a_checkpoint_without_manifest_is_refused(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "trainer.pt").write_bytes(b"x")
    with pytest.raises(CheckpointIntegrityError, match="no manifest"):
        verify_manifest(tmp_path / "state")

"""Ray resource bundles a plan is made of: the custom resource that pins work to a GPU type, and bundle sums."""

from __future__ import annotations


def accelerator_resource(accelerator_type: str | None) -> dict[str, float]:
    """The custom resource Ray uses to pin work to a GPU type (`accelerator_type:A100`); nodes offer 1 of it."""
    return {f"accelerator_type:{accelerator_type}": 0.001} if accelerator_type else {}


def sum_bundles(bundles: list[dict]) -> dict:
    """The total of each resource over `bundles`."""
    out: dict = {}
    for bundle in bundles:
        for key, value in bundle.items():
            out[key] = out.get(key, 0) + value
    return out

"""The `run` recipe block every training kind shares: where a run's outputs and checkpoints go and how it resumes."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from workloads.common.recipe import NAME_PATTERN, StrictModel

RESUME_LATEST = "latest"  # run.resume_from: continue this run's newest checkpoint


class RunConfig(StrictModel):
    name: str = Field("run", pattern=NAME_PATTERN, description="Run directory name.")
    output_dir: str = Field("runs", description="Parent of the run directory (summary, plots, model).")
    storage_path: str | None = Field(
        None, description="Ray Train storage (checkpoints): local dir or s3:// URI; default output_dir."
    )
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint.")
    resume_from: str | None = Field(
        None, description="A checkpoint directory to continue from, or `latest`: this run name's newest checkpoint "
                          "in its storage. Without it a run starts fresh and replaces that storage."
    )
    merge_adapter: bool = Field(False, description="Also write base+adapter merged weights.")
    register_as: str | None = Field(
        None, pattern=NAME_PATTERN, description="Register the adapter this run writes as the next version of this "
        "MLflow registered model (alias candidate; its parent the version the run's start adapter was registered "
        "as); the summary's registered_version (NAME@VERSION) is what `llmc promote` takes.",
    )
    forward_env: list[str] = Field(
        default_factory=list,
        description="Environment variables `llmc submit` forwards to the job (e.g. HF_TOKEN for gated weights).",
    )

    def directory(self, given: str | Path | None = None) -> Path:
        """The run directory: `given` (--output-dir), else `output_dir`/`name`; absolute."""
        return Path(given or Path(self.output_dir) / self.name).resolve()

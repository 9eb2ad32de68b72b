"""The `data` recipe block: where training rows come from (files, globs, a saved dataset or the hub), their
format and columns, mixing, packing and the eval split."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from workloads.common.paths import PATHS_CHECKED, REPO_ROOT, paths_checked, resolve_files, resolve_path
from workloads.common.recipe import StrictModel

DataFormat = Literal["alpaca", "messages", "sharegpt", "text"]
# The fields each format reads from a row; `columns` may map any of them onto a column of another name.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"), "messages": ("messages",), "sharegpt": ("conversations",),
    "text": ("text",),
}
_FORMAT_HELP = "alpaca: instruction/input/output; messages: OpenAI chat; sharegpt; text: raw."
_SOURCES = ("path", "data_files", "hub")


class _DatasetSource(StrictModel):
    """Where one dataset's rows come from, and which of its columns hold its format's fields."""

    path: str | None = Field(
        None, description="A JSON, JSONL, Parquet or CSV file (read by its suffix, other suffixes as JSON), or a "
        "directory written by `datasets` `save_to_disk`; relative to the working dir or repo."
    )
    data_files: list[str] | None = Field(
        None, min_length=1, description="Local files or glob patterns read as one dataset by "
        "`datasets.load_dataset(builder, data_files=...)` (e.g. shards: data/train-*.parquet)."
    )
    builder: Literal["json", "csv", "parquet"] | None = Field(
        None, description="Reader of `path` or `data_files`; null: from the (first) file's suffix."
    )
    hub: str | None = Field(
        None, description="A Hugging Face hub dataset id, read with `datasets.load_dataset(hub, subset, split=split)`"
        "; needs a reachable hub (probed with a short timeout first) or, with HF_HUB_OFFLINE=1, its local cache."
    )
    subset: str | None = Field(None, description="The hub dataset's configuration (subset) name.")
    split: str = Field(
        "train", min_length=1, description="Split read from `hub`, or from a `save_to_disk` directory holding a "
        "DatasetDict."
    )
    format: DataFormat | None = Field(
        None, description=f"{_FORMAT_HELP} Required for one dataset; in `data` beside `datasets`, the format of the "
        "entries that name none."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Format field: the dataset's column holding it, e.g. {instruction: question, "
        "output: answer} trains a question,answer CSV as alpaca; fields not named here are read from columns of their "
        "own name. Fields per format: " + "; ".join(f"{f}: {', '.join(v)}" for f, v in FORMAT_FIELDS.items()) + "."
    )
    eval_path: str | None = Field(
        None, description="Separate eval file or save_to_disk directory, read like `path` (builder, columns); else "
        "`eval_fraction` of this dataset is held out."
    )

    @field_validator("path", "eval_path")
    @classmethod
    def _file_exists(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and not paths_checked(info) and resolve_path(value) is None:
            raise ValueError(f"file not found (looked in {Path.cwd()} and {REPO_ROOT})")
        return value

    @field_validator("data_files")
    @classmethod
    def _files_match(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        missing = [pattern for pattern in value or [] if not paths_checked(info) and not resolve_files(pattern)]
        if missing:
            raise ValueError(f"no file matches {missing} (looked in {Path.cwd()} and {REPO_ROOT})")
        return value

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$", value):
            raise ValueError("a hub dataset id is NAME or OWNER/NAME (letters, digits, '_', '.', '-')")
        return value

    @field_validator("columns")
    @classmethod
    def _columns_fit_format(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        fmt = info.data.get("format")
        if fmt is not None:
            _check_columns(value, fmt)
        return value

    def _check_source(self) -> None:
        """Exactly one of path, data_files, hub, and only the options that source reads."""
        given = [name for name in _SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of path, data_files or hub; got {', '.join(given) or 'none'}")
        if self.builder is not None and self.hub is not None:
            raise ValueError("builder reads local files (path, data_files): not a hub dataset")
        if self.subset is not None and self.hub is None:
            raise ValueError("subset names a configuration of a hub dataset: set hub, or drop subset")
        on_disk = self.path is not None and (resolved := resolve_path(self.path)) is not None and resolved.is_dir()
        if self.split != "train" and not (self.hub or on_disk):
            raise ValueError(f"split {self.split!r} needs a hub dataset or a save_to_disk DatasetDict directory: a "
                             "file holds one split, train")


def _check_columns(columns: dict[str, str], fmt: str) -> None:
    unknown = sorted(set(columns) - set(FORMAT_FIELDS[fmt]))
    if unknown:
        raise ValueError(f"columns: {unknown} are not fields of format {fmt!r}; allowed: "
                         f"{', '.join(FORMAT_FIELDS[fmt])} (a field: the column holding it)")


class DatasetConfig(_DatasetSource):
    """One dataset of a mix (`data.datasets`)."""

    weight: float = Field(1.0, gt=0, description="Share of the mixed training set, relative to the other datasets' "
                                                 "weights (see data.datasets).")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        self._check_source()
        return self


class StreamingConfig(StrictModel):
    """`data.streaming`: Ray Data reads, checks and tokenizes (and packs) the training data on the cluster's CPUs, and
    each training worker streams its own shard; the driver holds no rows."""

    enabled: bool = Field(
        False, description="Stream the data through Ray Data (`llmc finetune`): for datasets larger than one "
        "machine's memory. Off: the driver reads and tokenizes every row once and each worker gets a copy (exact "
        "seeded order and mix; best for small data). See docs/data.md for what differs."
    )
    check_rows: int = Field(1000, ge=1, description="Rows of each dataset (first file) checked on the driver before "
                                                   "Ray starts; every row is checked again while streaming.")
    batch_rows: int = Field(256, ge=1, description="Rows per tokenization batch (`map_batches`); with packing, "
                                                  "examples are packed within such a batch.")
    shuffle_buffer_rows: int = Field(2048, ge=1, description="Each worker's local shuffle buffer (examples), "
                                                            "seeded with train.seed plus the epoch.")
    max_cpus: int | None = Field(
        None, ge=1, description="CPUs Ray Data's read and tokenize tasks may hold at once (null: what the cluster "
        "has beside the training workers). Set it to the cores a machine really has where Ray claims more logical "
        "CPUs (the embedded Ray claims 8 on a laptop): each task beyond them is one more process loading the "
        "tokenizer, on cores already busy."
    )


class DataConfig(_DatasetSource):
    """The training data: one dataset (path, data_files or hub, with its format) or a weighted mix (`datasets`)."""

    datasets: list[DatasetConfig] | None = Field(
        None, min_length=1, description="Several datasets mixed into one training set, instead of the one-dataset "
        "fields (path, data_files, hub, builder, subset, split, columns, eval_path); `format` is their default. Each "
        "contributes round(weight / sum of weights x N) examples, N the sum of their examples: all of its examples "
        "as often as fit whole, then a seeded random sample of the rest (so a weight above its share of N repeats "
        "it, one below subsamples it); the mix is then shuffled with train.seed. Eval: each dataset's eval set, "
        "concatenated."
    )
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of each dataset held out for eval when it "
                                                                    "has no eval_path.")
    max_length: int = Field(256, ge=8, description="Tokens per example (or per pack); longer is cut.")
    train_on_prompt: bool = Field(False, description="Also compute loss on prompt tokens.")
    packing: bool = Field(
        False, description="Put whole examples, in order, into blocks of up to `max_length` tokens. Each example "
        "keeps its own position_ids (from 0) and a block-diagonal causal attention mask stops it from attending to "
        "the others in its block, so a packed example trains as it would alone. Needs sdpa attention "
        "(model.attn_implementation null or sdpa)."
    )
    max_samples: int | None = Field(None, ge=1, description="Use only the first N training records (of each dataset).")
    system_prompt: str | None = Field(None, description="Prepended as a system turn to every example.")
    streaming: StreamingConfig = Field(default_factory=StreamingConfig, description="Ray Data streaming of the "
                                       "training data (fine-tuning).")
    cache: bool = Field(True, description="Keep the tokenized train and eval examples (the driver path, not "
                        "data.streaming) under $LLMC_CACHE/prepared: a rerun whose data files' contents, "
                        "data settings, seed, tokenizer and eval generation settings are unchanged skips reading, "
                        "checking and tokenizing them. Hub datasets are never kept.")

    @model_validator(mode="after")
    def _one_form(self) -> DataConfig:
        if self.datasets is None:
            self._check_source()
            if self.format is None:
                raise ValueError(f"format is required; allowed: {', '.join(FORMAT_FIELDS)}")
            return self
        single = [name for name in (*_SOURCES, "builder", "subset", "eval_path") if getattr(self, name) is not None]
        single += ["columns"] * bool(self.columns) + ["split"] * (self.split != "train")
        if single:
            raise ValueError(f"datasets replaces the one-dataset fields: move {', '.join(single)} into its entries")
        for i, dataset in enumerate(self.datasets):
            if dataset.format is None and self.format is None:
                raise ValueError(f"datasets.{i}.format is required (or a default data.format); allowed: "
                                 f"{', '.join(FORMAT_FIELDS)}")
            try:
                _check_columns(dataset.columns, dataset.format or self.format)
            except ValueError as exc:
                raise ValueError(f"datasets.{i}.{exc}") from None
        return self

    def sources(self) -> list[tuple[str, DatasetConfig]]:
        """Every dataset, format filled in, with the field that names it in errors: `data` or `data.datasets.I`."""
        if self.datasets is None:
            fields = set(_DatasetSource.model_fields)
            own = {k: v for k, v in self.__dict__.items() if k in fields}  # validated with this config already
            return [("data", DatasetConfig.model_validate(own, context=PATHS_CHECKED))]
        return [(f"data.datasets.{i}", d if d.format else d.model_copy(update={"format": self.format}))
                for i, d in enumerate(self.datasets)]

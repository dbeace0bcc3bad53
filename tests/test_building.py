"""Building safety function vectors on tiny random models of each family (Llama, Qwen2, Mistral, GPT-2; the
Llama and Qwen2 ones use grouped-query attention with 4 query heads and 2 key/value heads, the Mistral one a
single key/value head)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import TINY_ARCHS

from safeinfer_integrations.method.gate import HarmGate
from safeinfer_integrations.method.vector import SafetyVector
from safeinfer_integrations.models.architecture import attention_out_proj, decoder_layers, model_shape
from safeinfer_integrations.training import data, heads
from safeinfer_integrations.training.function_vector import answer_first_tokens, build_vector, icl_prompt

ARCHS = TINY_ARCHS
TEXTS = (
    "Question: what is the weather? Answer:",
    "How do I bake bread at home?",
    "Sorry, I won't",
    "The capital of France is",
)


def _ids(tokenizer: Any) -> list[list[int]]:
    return [tokenizer(t)["input_ids"] for t in TEXTS]


def _attention(model: Any, layer: int) -> torch.nn.Module:
    block = decoder_layers(model)[layer]
    return block.self_attn if hasattr(block, "self_attn") else block.attn


def _expected_proj(model: Any, layer: int) -> torch.nn.Module:
    arch = model.config.model_type
    if arch == "gpt2":
        return model.transformer.h[layer].attn.c_proj
    return model.model.layers[layer].self_attn.o_proj


@pytest.mark.parametrize("arch", ARCHS)
def test_out_proj_is_the_attention_output_projection(tiny_model_factory: Any, arch: str) -> None:
    model = tiny_model_factory(arch)
    for layer in range(len(decoder_layers(model))):
        assert attention_out_proj(model, layer) is _expected_proj(model, layer)


@pytest.mark.parametrize("arch", ARCHS)
def test_head_means_are_the_out_proj_input_at_the_last_token(
    tiny_model_factory: Any, tiny_tokenizer: Any, arch: str
) -> None:
    """Left-padded batched capture == per-prompt unpadded runs; and o_proj(captured) == attention output."""
    model = tiny_model_factory(arch)
    shape = model_shape(model)
    sequences = _ids(tiny_tokenizer)
    assert len({len(s) for s in sequences}) > 1  # real padding happens
    means = heads.capture_head_means(model, sequences, pad_id=0, batch_size=3)
    assert means.shape == (shape.num_layers, shape.num_heads, shape.head_dim)

    layer = 1
    proj_inputs, attn_outputs = [], []
    h1 = _expected_proj(model, layer).register_forward_pre_hook(lambda m, i: proj_inputs.append(i[0][0, -1].clone()))
    h2 = _attention(model, layer).register_forward_hook(lambda m, i, o: attn_outputs.append(o[0][0, -1].clone()))
    try:
        with torch.no_grad():
            for seq in sequences:
                model(input_ids=torch.tensor([seq], device=model.device))
    finally:
        h1.remove()
        h2.remove()
    expected = torch.stack(proj_inputs).mean(0).view(shape.num_heads, shape.head_dim).cpu()  # means live on the CPU
    torch.testing.assert_close(means[layer].double(), expected, rtol=1e-5, atol=1e-6)
    # The captured tensor is what the projection turns into the attention block's output.
    with torch.no_grad():
        projected = _expected_proj(model, layer)(torch.stack(proj_inputs)[:, None, :])[:, 0]
    torch.testing.assert_close(projected, torch.stack(attn_outputs))


@pytest.mark.parametrize("arch", ARCHS)
def test_function_vector_equals_the_explicit_sum(tiny_model_factory: Any, tiny_tokenizer: Any, arch: str) -> None:
    model = tiny_model_factory(arch)
    shape = model_shape(model)
    means = heads.capture_head_means(model, _ids(tiny_tokenizer), pad_id=0)
    chosen = [(0, 1), (2, 3), (1, 0), (2, 0)]
    fv = heads.function_vector(model, means, chosen)
    by_hand = torch.zeros(shape.hidden_size, dtype=torch.float64)
    for layer, head in chosen:
        block = slice(head * shape.head_dim, (head + 1) * shape.head_dim)
        weight = _expected_proj(model, layer).weight.double().cpu()  # the function vector lives on the CPU
        a = means[layer, head].double()
        # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out). The bias is not part of a head.
        by_hand += a @ weight[block, :] if arch == "gpt2" else weight[:, block] @ a
    torch.testing.assert_close(fv.double(), by_hand, rtol=1e-5, atol=1e-6)
    assert fv.shape == (shape.hidden_size,)


@pytest.mark.parametrize("arch", ARCHS)
def test_indirect_effect_equals_direct_recomputation(tiny_model_factory: Any, tiny_tokenizer: Any, arch: str) -> None:
    model = tiny_model_factory(arch)
    sequences = _ids(tiny_tokenizer)
    means = heads.capture_head_means(model, sequences[:2], pad_id=0)
    targets = [5, 17, 33]
    effects = heads.indirect_effects(model, sequences, 0, means, targets, batch_size=3)
    base = [float(heads.target_probability(model, [s], 0, targets)[0]) for s in sequences]
    assert effects.abs().max() > 1e-4  # patching does something on these random models
    for layer, head in [(0, 0), (1, 2), (2, 3)]:
        direct = sum(
            heads.patched_probability(model, s, layer, head, means[layer, head], targets) - b
            for s, b in zip(sequences, base)
        ) / len(sequences)
        assert float(effects[layer, head]) == pytest.approx(direct, rel=1e-4, abs=1e-8)


def test_patching_a_head_with_its_own_value_changes_nothing(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    model = tiny_model_factory("llama")
    sequence = _ids(tiny_tokenizer)[0]
    own = heads.capture_head_means(model, [sequence], pad_id=0)
    effects = heads.indirect_effects(model, [sequence], 0, own, [5, 17])
    assert effects.abs().max() < 1e-6  # means are stored as float32


def test_top_heads_order_and_validation() -> None:
    effects = torch.tensor([[0.1, 0.5], [0.5, -0.2], [0.3, 0.0]])
    assert heads.top_heads(effects, 3) == [
        (0, 1, pytest.approx(0.5)),
        (1, 0, pytest.approx(0.5)),
        (2, 0, pytest.approx(0.3)),
    ]
    with pytest.raises(ValueError, match="k must be between 1 and 6"):
        heads.top_heads(effects, 7)


def test_icl_prompt_format_and_first_tokens(tiny_tokenizer: Any) -> None:
    assert icl_prompt([("q1", "a1"), ("q2", "a2")], "q3") == "Q: q1\nA: a1\n\nQ: q2\nA: a2\n\nQ: q3\nA:"
    tokens = answer_first_tokens(tiny_tokenizer, ["I can't", "Sorry, no", "I won't"])
    assert tokens == sorted({tiny_tokenizer(" I")["input_ids"][0], tiny_tokenizer(" Sorry")["input_ids"][0]})


def _tiny_build(model: Any, tokenizer: Any, **kwargs: Any) -> Any:
    settings: dict[str, Any] = dict(
        model_name="tiny",
        heads=3,
        trials=3,
        shots=1,
        progress=False,
        layer=1,
        scale=2.0,
        framings=data.gate_framings()[:2],
    )  # the short ones: fast
    settings.update(kwargs)
    return build_vector(model, tokenizer, **settings)


@pytest.mark.parametrize("arch", ARCHS)
def test_build_is_deterministic_and_recorded(tiny_model_factory: Any, tiny_tokenizer: Any, arch: str) -> None:
    model = tiny_model_factory(arch)
    first = _tiny_build(model, tiny_tokenizer, seed=3)
    again = _tiny_build(model, tiny_tokenizer, seed=3)
    other = _tiny_build(model, tiny_tokenizer, seed=4, gate=False)
    assert torch.equal(first.vector.vector, again.vector.vector)
    assert torch.equal(first.vector.gate.direction, again.vector.gate.direction)
    assert not torch.equal(first.vector.vector, other.vector.vector)
    assert other.vector.gate is None
    meta = first.vector.metadata
    top = heads.top_heads(first.effects, 3)
    assert meta["heads"] == [[lay, hd, round(s, 6)] for lay, hd, s in top]
    fv = heads.function_vector(model, first.means, [(lay, hd) for lay, hd, _ in top])
    assert torch.equal(first.vector.vector, fv)
    assert meta["config_hash"] == model_shape(model).config_hash()
    assert meta["dataset_hash"] == data.dataset_hash()
    assert meta["model_name"] == "tiny" and meta["builder_version"]
    assert meta["gate"]["layer"] == first.vector.gate.layer and meta["gate"]["method"] == "probe"
    assert meta["gate"]["framings"] == ["chat", "system_prompt"]
    assert (first.vector.layer, first.vector.scale) == (1, 2.0)
    # a gate passed in (as `build-vector --gate-from` does) is used as is and described as given
    given = _tiny_build(model, tiny_tokenizer, seed=3, gate=first.vector.gate, gate_metadata={"layer": 9})
    assert torch.equal(given.vector.vector, first.vector.vector) and given.gate_fit is None
    assert given.vector.gate is first.vector.gate
    assert given.vector.metadata["gate"] == {"layer": 9, "source": "given"}


def test_fit_gate_refits_only_the_gate(
    tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any, capsys: Any, monkeypatch: Any
) -> None:
    """``safeinfer fit-gate`` keeps the steering vector, layer, scale and build record and replaces the gate, fitted
    on the bundled data in `data.gate_fit_framings` (here the bare chat alone, for speed); a vector for another
    model is refused before anything is written."""
    from safeinfer_integrations.cli import main
    from safeinfer_integrations.training.gate_fit import with_fitted_gate

    monkeypatch.setattr(data, "gate_fit_framings", lambda: data.gate_framings()[:1])
    directory = tmp_path / "tiny-gpt2"
    model = tiny_model_factory("gpt2")
    model.save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    source = _tiny_build(model, tiny_tokenizer, gate=False).vector
    source_path = source.save(tmp_path / "gateless.safetensors")
    out = tmp_path / "gated.safetensors"
    assert (
        main(["fit-gate", "--model", str(directory), "--vector", str(source_path), "--out", str(out), "--l2", "0.01"])
        == 0
    )
    refitted = SafetyVector.load(out)
    assert torch.equal(refitted.vector, source.vector) and (refitted.layer, refitted.scale) == (
        source.layer,
        source.scale,
    )
    assert refitted.gate is not None and refitted.vector_id != source.vector_id
    gate = refitted.metadata["gate"]
    assert gate["source"] == "fitted" and gate["framings"] == ["chat"] and gate["layer"] == refitted.gate.layer
    assert gate["dataset_hash"] == data.gate_dataset_hash() and gate["previous_vector_id"] == source.vector_id
    assert gate["n_harmful"] == len(data.gate_harmful_questions())
    assert gate["l2"] == 0.01 and gate["layer_choice"] == "cross-validated"
    assert {k: v for k, v in refitted.metadata.items() if k != "gate"} == {
        k: v for k, v in source.metadata.items() if k != "gate"
    }
    again = with_fitted_gate(source, model, tiny_tokenizer, l2=0.01)
    # the same fit (the model reloaded from disk gives last-bit differences)
    assert (
        torch.allclose(again.gate.direction, refitted.gate.direction, atol=1e-5)
        and again.gate.layer == refitted.gate.layer
    )
    other = _tiny_build(tiny_model_factory("llama"), tiny_tokenizer, gate=False).vector.save(
        tmp_path / "llama.safetensors"
    )
    refused = tmp_path / "refused.safetensors"
    assert main(["fit-gate", "--model", str(directory), "--vector", str(other), "--out", str(refused)]) == 2
    assert "model_type 'llama' != model's 'gpt2'" in capsys.readouterr().err
    assert not refused.exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any, arch: str) -> None:
    model = tiny_model_factory(arch)
    vector = _tiny_build(model, tiny_tokenizer).vector
    loaded = SafetyVector.load(vector.save(tmp_path / "v.safetensors"))
    assert torch.equal(loaded.vector, vector.vector)
    assert (loaded.layer, loaded.scale, loaded.vector_id) == (vector.layer, vector.scale, vector.vector_id)
    assert dict(loaded.metadata) == dict(vector.metadata)
    assert loaded.metadata["architecture"] == model_shape(model).__dict__
    assert torch.equal(loaded.gate.direction, vector.gate.direction)
    assert (loaded.gate.layer, loaded.gate.bias, loaded.gate.floor) == (
        vector.gate.layer,
        vector.gate.bias,
        vector.gate.floor,
    )
    loaded.check(model)


def test_vector_id_covers_the_gate() -> None:
    """A refitted gate changes what a vector does, so it changes the id (eval runs compare ids)."""
    base = SafetyVector(vector=torch.ones(4), layer=1, scale=1.0)
    gate = HarmGate(direction=torch.ones(4), layer=2, bias=0.5)
    gated = SafetyVector(vector=torch.ones(4), layer=1, scale=1.0, gate=gate)
    ids = {
        base.vector_id,
        gated.vector_id,
        SafetyVector(vector=torch.ones(4), layer=1, scale=1.0, gate=HarmGate(torch.ones(4), 2, bias=0.6)).vector_id,
        SafetyVector(vector=torch.ones(4), layer=1, scale=1.0, gate=HarmGate(torch.ones(4), 3, bias=0.5)).vector_id,
        SafetyVector(
            vector=torch.ones(4), layer=1, scale=1.0, gate=HarmGate(torch.tensor([1.0, 1.0, 1.0, 2.0]), 2, bias=0.5)
        ).vector_id,
    }
    assert len(ids) == 5
    assert gated.vector_id == SafetyVector(vector=torch.ones(4), layer=1, scale=1.0, gate=gate).vector_id


@pytest.mark.parametrize("arch", ARCHS)
def test_mismatch_errors_name_what_differs(tiny_model_factory: Any, tiny_tokenizer: Any, arch: str) -> None:
    vector = _tiny_build(tiny_model_factory(arch), tiny_tokenizer, gate=False).vector
    other = "gpt2" if arch != "gpt2" else "llama"
    with pytest.raises(
        ValueError,
        match=rf"built for tiny \(architecture hash .*{other}, hidden 48, 3 layers, "
        rf"4 heads.*: model_type '{arch}' != model's '{other}'",
    ):
        vector.check(tiny_model_factory(other))
    with pytest.raises(ValueError, match=r"layer 7 is out of range: the model has 3 layers"):
        vector.with_settings(layer=7).check(tiny_model_factory(arch))


def test_mismatch_of_heads_or_vocabulary_alone_is_named(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    """Same family and hidden size, other head count and vocabulary: the message names just those fields."""
    from transformers import AutoModelForCausalLM

    model = tiny_model_factory("llama")
    vector = _tiny_build(model, tiny_tokenizer, gate=False).vector
    config = model.config.to_dict()
    config.update(num_attention_heads=6, num_key_value_heads=2, head_dim=8, vocab_size=config["vocab_size"] + 5)
    other = AutoModelForCausalLM.from_config(type(model.config).from_dict(config))
    with pytest.raises(ValueError) as error:
        vector.check(other)
    message = str(error.value)
    assert "num_heads 4 != model's 6" in message and "head_dim 12 != model's 8" in message
    assert f"vocab_size {config['vocab_size'] - 5} != model's {config['vocab_size']}" in message
    assert "hidden_size" not in message.split("):")[-1] and "num_layers" not in message.split("):")[-1]
    # a vector saved before the fields were recorded still names the two hashes
    legacy = SafetyVector(
        vector=vector.vector,
        layer=vector.layer,
        metadata={k: v for k, v in vector.metadata.items() if k != "architecture"},
    )
    with pytest.raises(ValueError, match=r"model has architecture hash \w+ \(llama, hidden 48, 3 layers, 6 heads"):
        legacy.check(other)


def test_bad_arguments_are_rejected(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    model = tiny_model_factory("llama")
    with pytest.raises(ValueError, match="heads must be an int >= 1; got 0"):
        _tiny_build(model, tiny_tokenizer, heads=0)
    with pytest.raises(ValueError, match=r"heads must be at most 12 \(3 layers x 4 heads\); got 13"):
        _tiny_build(model, tiny_tokenizer, heads=13)
    with pytest.raises(ValueError, match=r"layer must be in 0..2 for this model; got 3"):
        _tiny_build(model, tiny_tokenizer, layer=3)
    with pytest.raises(TypeError, match="pass the tokenizer"):
        build_vector(model, None)


def test_cli_builds_a_vector(tiny_model_factory: Any, tiny_tokenizer: Any, tmp_path: Any, capsys: Any) -> None:
    from safeinfer_integrations.cli import main

    directory = tmp_path / "tiny-gpt2"
    tiny_model_factory("gpt2").save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    source = _tiny_build(tiny_model_factory("gpt2"), tiny_tokenizer).vector.save(tmp_path / "gated.safetensors")
    out = tmp_path / "fv.safetensors"
    code = main(
        [
            "build-vector",
            "--model",
            str(directory),
            "--out",
            str(out),
            "--heads",
            "2",
            "--trials",
            "2",
            "--shots",
            "1",
            "--layer",
            "2",
            "--seed",
            "1",
            "--gate-from",
            str(source),
        ]
    )
    assert code == 0
    loaded, gated = SafetyVector.load(out), SafetyVector.load(source)
    assert loaded.layer == 2 and len(loaded.metadata["heads"]) == 2
    assert loaded.metadata["build"]["seed"] == 1
    assert torch.equal(loaded.gate.direction, gated.gate.direction) and loaded.gate.bias == gated.gate.bias
    assert loaded.metadata["gate"]["taken_from"] == gated.vector_id
    assert main(["build-vector", "--model", str(directory), "--out", str(out), "--heads", "0"]) == 2
    assert "heads must be an int >= 1" in capsys.readouterr().err
    gateless = _tiny_build(tiny_model_factory("gpt2"), tiny_tokenizer, gate=False).vector.save(
        tmp_path / "gateless.safetensors"
    )
    for command in ("build-vector", "optimize-vector"):
        assert (
            main(
                [
                    command,
                    "--model",
                    str(directory),
                    "--out",
                    str(tmp_path / "x.safetensors"),
                    "--gate-from",
                    str(gateless),
                ]
            )
            == 2
        )
        assert f"--gate-from {gateless}: that vector has no harm gate" in capsys.readouterr().err
        assert not (tmp_path / "x.safetensors").exists()


def test_splits_are_disjoint_and_stable() -> None:
    harmful = {name: {d.question for d in data.harmful_demos(name)} for name in data.HARMFUL_SPLITS}
    benign = {name: {p.question for p in data.benign_prompts(name)} for name in data.BENIGN_SPLITS}
    assert [len(harmful[n]) for n in data.HARMFUL_SPLITS] == [132, 44, 88]
    assert sum(len(v) for v in benign.values()) == 152
    for group in (harmful, benign):
        names = list(group)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert not group[a] & group[b]
    for category in {d.category for d in data.harmful_demos()}:
        assert sum(d.category == category for d in data.harmful_demos("calibration")) == 4
    with pytest.raises(ValueError, match="harmful split must be one of build, calibration, evaluation"):
        data.harmful_demos("test")  # type: ignore[arg-type]


def test_everyday_requests_split_seven_to_three_per_category() -> None:
    build = data.harmful_everyday("build")
    held = data.harmful_everyday("calibration")
    assert len(build) == 77 and len(held) == 33
    assert not {d.question for d in build} & {d.question for d in held}
    for category in {d.category for d in data.harmful_demos()}:
        assert [sum(d.category == category for d in split) for split in (build, held)] == [7, 3]
    gate_fit = data.gate_harmful_questions()
    agent = [r.question for r in data.harmful_agent_requests("build")]
    assert gate_fit == [d.question for d in data.harmful_demos("build")] + [d.question for d in build] + agent
    held_in = data.held_in_harmful_questions()
    assert held_in[-33:] == [d.question for d in held] and not set(held_in) & set(gate_fit)
    with pytest.raises(ValueError, match="everyday harmful split must be one of build, calibration; got 'x'"):
        data.harmful_everyday("x")  # type: ignore[arg-type]


def test_everyday_benign_questions_and_requests_split_per_kind() -> None:
    gate, held = data.benign_everyday("gate"), data.benign_everyday("calibration")
    req_gate, req_held = data.benign_requests("gate"), data.benign_requests("calibration")
    for kind in ("ordinary", "sensitive_sounding"):
        assert [sum(p.kind == kind for p in split) for split in (gate, held)] == [20, 10]
        assert [sum(p.kind == kind for p in split) for split in (req_gate, req_held)] == [33, 17]
    agent_gate = data.benign_agent_requests("gate")
    assert data.gate_benign_questions() == (
        [p.question for p in data.benign_prompts("gate")]
        + [p.question for p in gate]
        + [p.question for p in req_gate]
        + [p.question for p in agent_gate]
    )
    assert data.held_in_benign_questions()[-54:] == [p.question for p in held + req_held]
    assert not set(data.gate_benign_questions()) & set(data.held_in_benign_questions())
    with pytest.raises(ValueError, match="everyday benign split must be one of gate, calibration; got 'x'"):
        data.benign_everyday("x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="benign request split must be one of gate, calibration; got 'x'"):
        data.benign_requests("x")  # type: ignore[arg-type]


def test_agent_requests_split_per_category_and_kind_and_feed_only_the_gate() -> None:
    build, held = data.harmful_agent_requests("build"), data.harmful_agent_requests("calibration")
    for category in {d.category for d in data.harmful_demos()}:
        assert [sum(r.category == category for r in split) for split in (build, held)] == [3, 1]
    gate, benign_held = data.benign_agent_requests("gate"), data.benign_agent_requests("calibration")
    for kind in ("ordinary", "sensitive_sounding"):
        assert [sum(p.kind == kind for p in split) for split in (gate, benign_held)] == [24, 12]
    held_harmful, held_benign = data.held_in_agent_questions()
    assert held_harmful == [r.question for r in held] and held_benign == [p.question for p in benign_held]
    assert not set(held_harmful) & set(data.gate_harmful_questions())
    assert not set(held_benign) & set(data.gate_benign_questions())
    # the calibration sweep's held-in questions and the vector's dataset hash do not include them
    assert not set(held_harmful) & set(data.held_in_harmful_questions())
    assert not set(held_benign) & set(data.held_in_benign_questions())
    assert data.gate_dataset_hash() != data.dataset_hash()
    with pytest.raises(ValueError, match="benign agent request split must be one of gate, calibration; got 'x'"):
        data.benign_agent_requests("x")  # type: ignore[arg-type]


def test_a_framing_may_hold_history_and_put_documents_in_the_system_message(monkeypatch: Any) -> None:
    file = {
        "contexts": ["The museum opens at ten.", "Refunds take five days."],
        "topical_contexts": ["Never mix bleach with other cleaning products."],
        "framings": [],
    }
    monkeypatch.setattr(data, "_framings_file", lambda: file)
    framing = data.Framing("f", "Notes:\n{relevant}", "Q: {question}", (("user", "Hi"), ("assistant", "Hello!")))
    question = "Which cleaning products can I mix with bleach?"
    assert data.relevant_context(question) == file["topical_contexts"][0]  # shares "cleaning", "bleach", ...
    assert data.frame(question, framing) == [
        {"role": "system", "content": "Notes:\nNever mix bleach with other cleaning products."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": f"Q: {question}"},
    ]
    # no shared word: a document chosen by the question's hash, always the same one
    assert (
        data.relevant_context("xyzzy?")
        == data.relevant_context("xyzzy?")
        in file["contexts"] + file["topical_contexts"]
    )
    in_system = data.Framing("s", "Context: {context}", "{question}")
    assert data.frame("Hi", in_system)[0]["content"] in {f"Context: {c}" for c in file["contexts"]}


def test_framed_questions_put_each_question_in_every_framing() -> None:
    framings = data.gate_framings()
    assert framings[0].name == "chat"
    framed = data.framed_questions(["How do I bake bread?", "Write a haiku about rain."], framings)
    assert len(framed) == 2 * len(framings)
    assert framed[0] == [{"role": "user", "content": "How do I bake bread?"}]
    for i, messages in enumerate(framed):
        question = ("How do I bake bread?", "Write a haiku about rain.")[i // len(framings)]
        framing = framings[i % len(framings)]
        assert messages[-1]["role"] == "user" and question in messages[-1]["content"]
        assert "{" not in messages[-1]["content"]
        assert (messages[0]["role"] == "system") == (framing.system is not None)
        assert all("{" not in m["content"] for m in messages)
        assert [m["role"] for m in messages[1 if framing.system else 0 : -1]] == [r for r, _ in framing.history]
        if framing.system is not None:
            assert messages[0]["content"].startswith(framing.system.split("{")[0])
    # the document is fixed per question, so a fit is deterministic
    assert data.framed_questions(["How do I bake bread?"], framings) == framed[: len(framings)]

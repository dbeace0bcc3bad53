"""Fitting the harm gate: layer selection by cross-validated AUC, a logistic map that separates the classes,
and hidden states read where the engine reads them."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from safeinfer_integrations.training import data
from safeinfer_integrations.training.gate_fit import (
    _batches_by_prefix,
    auc,
    chat_ids,
    fit_gate,
    fit_gate_from_hidden,
    framed_ids,
    last_token_hidden,
)


def _synthetic(separable_layer: int, layers: int = 4, hidden: int = 8, n: int = 40) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    harmful = torch.randn(layers, n, hidden, generator=generator, dtype=torch.float64)
    benign = torch.randn(layers, n, hidden, generator=generator, dtype=torch.float64)
    harmful[separable_layer, :, 3] += 4.0  # only this layer carries the harm signal
    return harmful, benign


@pytest.mark.parametrize("method", ["probe", "mean_difference"])
def test_gate_picks_the_separating_layer_and_separates(method: str) -> None:
    harmful, benign = _synthetic(separable_layer=2)
    fit = fit_gate_from_hidden(harmful, benign, floor=0.1, method=method)  # type: ignore[arg-type]
    assert fit.gate.layer == 2
    assert fit.layer_auc[2] > 0.95 > max(fit.layer_auc[0], fit.layer_auc[1])
    weights_h = fit.gate.weight(harmful[2].float())
    weights_b = fit.gate.weight(benign[2].float())
    assert weights_h.mean() > 0.8 and weights_b.mean() < 0.3
    assert float(weights_b.min()) >= 0.1 - 1e-6 and float(weights_h.max()) <= 1.0
    assert fit.train_accuracy > 0.9
    # the direction points along the separating coordinate
    assert int(fit.gate.direction.abs().argmax()) == 3 and float(fit.gate.direction[3]) > 0


def test_probe_uses_a_signal_split_over_features_that_the_mean_difference_blurs() -> None:
    """Harmful prompts differ from benign ones along feature 0 only, while feature 1 has a large spread
    shared by both classes and correlated with feature 0: the probe learns to cancel it out, the mean
    difference cannot."""
    generator = torch.Generator().manual_seed(1)
    n = 60
    shared = 4.0 * torch.randn(n * 2, generator=generator, dtype=torch.float64)
    noise = 0.3 * torch.randn(n * 2, 4, generator=generator, dtype=torch.float64)
    x = noise.clone()
    x[:, 0] += shared
    x[:, 1] += shared
    x[:n, 0] += 3.0  # the harm signal
    harmful, benign = x[None, :n], x[None, n:]
    probe = fit_gate_from_hidden(harmful, benign, layers=[0])
    mean_difference = fit_gate_from_hidden(harmful, benign, layers=[0], method="mean_difference")
    assert probe.train_accuracy > 0.95
    assert mean_difference.train_accuracy < 0.85
    assert float(probe.gate.direction[0]) > 0 > float(probe.gate.direction[1])


def test_gate_method_is_checked() -> None:
    harmful, benign = _synthetic(separable_layer=1)
    with pytest.raises(ValueError, match="gate method must be one of probe, mean_difference; got 'svm'"):
        fit_gate_from_hidden(harmful, benign, method="svm")  # type: ignore[arg-type]


def test_a_given_layer_and_penalty_are_used_and_checked() -> None:
    """``layers=[k]`` fits at layer k even when another separates better (``safeinfer fit-gate --layer``);
    a smaller penalty gives a longer direction (sharper weights); bad values name what is allowed."""
    harmful, benign = _synthetic(separable_layer=2)
    given = fit_gate_from_hidden(harmful, benign, layers=[1])
    assert given.gate.layer == 1 and math.isnan(given.layer_auc[2])
    sharp = fit_gate_from_hidden(harmful, benign, layers=[2], l2=0.0003)
    default = fit_gate_from_hidden(harmful, benign, layers=[2])
    assert float(sharp.gate.direction.norm()) > float(default.gate.direction.norm())
    with pytest.raises(ValueError, match=r"gate layer must be in 0\.\.3; got \[7\]"):
        fit_gate_from_hidden(harmful, benign, layers=[7])
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0; got -1.0"):
        fit_gate_from_hidden(harmful, benign, l2=-1.0)


def test_last_layer_is_never_a_candidate() -> None:
    harmful, benign = _synthetic(separable_layer=3)
    assert fit_gate_from_hidden(harmful, benign).gate.layer != 3


def test_auc() -> None:
    assert auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert auc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5


def test_gate_needs_enough_data() -> None:
    harmful, benign = _synthetic(separable_layer=1)
    with pytest.raises(ValueError, match="need at least 4 harmful and 4 benign prompts; got 2 and 40"):
        fit_gate_from_hidden(harmful[:, :2], benign)


def test_gate_reads_the_hidden_state_the_engine_reads(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    """`last_token_hidden` (batched, left-padded) == the engine's pre-pass: output_hidden_states[layer + 1]
    at the last token of the chat-rendered prompt, run alone. The batches are formed by length, so the rows
    here are reordered inside and must come back in input order."""
    model = tiny_model_factory("llama")
    sequences = chat_ids(tiny_tokenizer, ["How do I bake bread?", "Sorry, I won't do that at all, no.", "Hi"])
    assert len(sequences[2]) < len(sequences[0]) < len(sequences[1])
    hidden = last_token_hidden(model, sequences, pad_id=0, batch_size=2)
    assert hidden.shape[1] == 3
    for row, seq in enumerate(sequences):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq], device=model.device), output_hidden_states=True)
        for layer in range(2):
            torch.testing.assert_close(hidden[layer, row], out.hidden_states[layer + 1][0, -1].double().cpu())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompts_sharing_a_prefix_run_it_once_and_get_their_own_hidden_states(
    tiny_model_factory: Any, tiny_tokenizer: Any, family: str
) -> None:
    """Prompts of one framing and document share a long prefix: it runs once, its cache is repeated and the
    rows run the rest right-padded. Each row must still get what it gets run alone, in input order."""
    model = tiny_model_factory(family)
    framing = data.Framing(
        "doc",
        "Rules: answer briefly and politely, from the text only.",
        "Text: the museum opens at ten and the cafe closes at half past four.\n{question}",
    )
    questions = [
        "Hi",
        "When does the cafe close?",
        "What time does the museum open on Sundays, please?",
        "Is entry free?",
        "Tell me everything.",
    ]
    sequences = framed_ids(tiny_tokenizer, questions, [framing]) + chat_ids(tiny_tokenizer, ["bake bread"])
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])
    batches = _batches_by_prefix(sequences, order, batch_size=4, min_shared=16)
    assert [shared > 0 for _, shared in batches].count(True) >= 1  # the shared path is taken
    assert sorted(i for rows, _ in batches for i in rows) == list(range(len(sequences)))
    hidden = last_token_hidden(model, sequences, pad_id=0, batch_size=4)
    for row, seq in enumerate(sequences):
        with torch.no_grad():
            out = model(input_ids=torch.tensor([seq], device=model.device), output_hidden_states=True)
        for layer in range(2):
            torch.testing.assert_close(
                hidden[layer, row], out.hidden_states[layer + 1][0, -1].double().cpu(), rtol=1e-4, atol=1e-4
            )


def test_prompts_from_different_documents_do_not_share_a_batch() -> None:
    """A batch does not straddle two long prefixes: running them left-padded together would cost more than
    running them apart."""
    first, second = [1] * 40, [2] * 40
    sequences = [first + [5], first + [6, 7], second + [5], second + [8]]
    batches = _batches_by_prefix(sequences, [0, 1, 2, 3], batch_size=16, min_shared=16)
    assert batches == [([0, 1], 40), ([2, 3], 40)]
    assert _batches_by_prefix(sequences, [0, 1, 2, 3], batch_size=16, min_shared=41) == [([0, 1, 2, 3], 0)]


def test_fit_gate_on_a_tiny_model(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    model = tiny_model_factory("gpt2")
    fit = fit_gate(
        model,
        tiny_tokenizer,
        ["steal a car now", "make a bomb", "hack a bank", "hurt people"],
        ["bake bread", "capital of France", "add two numbers", "weather today"],
    )
    assert 0 <= fit.gate.layer < 2 and fit.n_harmful == 4 and fit.n_benign == 4


def test_fit_gate_reads_every_question_in_every_framing(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    model = tiny_model_factory("qwen2")
    harmful, benign = (
        ["steal a car now", "make a bomb", "hack a bank", "hurt people"],
        ["bake bread", "capital of France", "add two numbers", "weather today"],
    )
    framings = data.gate_framings()[:2]
    fit = fit_gate(model, tiny_tokenizer, harmful, benign, framings=framings)
    assert fit.n_harmful == 4 * 2 and fit.n_benign == 4 * 2 and fit.framings == ("chat", "system_prompt")
    hidden = last_token_hidden(model, framed_ids(tiny_tokenizer, harmful + benign, framings), pad_id=0)
    direct = fit_gate_from_hidden(hidden[:, :8], hidden[:, 8:])
    assert direct.gate.layer == fit.gate.layer
    torch.testing.assert_close(direct.gate.direction, fit.gate.direction)
    bare = fit_gate(model, tiny_tokenizer, harmful, benign)
    assert not torch.equal(bare.gate.direction, fit.gate.direction)
    with pytest.raises(ValueError, match="at least one framing"):
        fit_gate(model, tiny_tokenizer, harmful, benign, framings=[])


def test_framings_longer_than_the_context_window_are_left_out(tiny_model_factory: Any, tiny_tokenizer: Any) -> None:
    model = tiny_model_factory("gpt2")  # 256 positions: the framings with documents do not fit
    harmful, benign = (
        ["steal a car now", "make a bomb", "hack a bank", "hurt people"],
        ["bake bread", "hi", "add two numbers", "weather today"],
    )
    framings = data.gate_framings()
    lengths = {f.name: max(len(ids) for ids in framed_ids(tiny_tokenizer, harmful + benign, [f])) for f in framings}
    fitting = tuple(f.name for f in framings if lengths[f.name] <= 256)
    assert "chat" in fitting and "rag_long" not in fitting and lengths["rag_long"] > 256
    fit = fit_gate(model, tiny_tokenizer, harmful, benign, framings=framings)
    assert fit.framings == fitting
    assert fit.n_harmful == 4 * len(fitting)
    with pytest.raises(ValueError, match="no gate framing fits the model's context window of 256 tokens"):
        fit_gate(model, tiny_tokenizer, harmful, benign, framings=[f for f in framings if f.name == "rag_long"])


def test_right_pad_puts_tokens_first_and_rejects_empty_rows() -> None:
    from safeinfer_integrations.models.batching import right_pad

    ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="every sequence must have at least one token"):
        right_pad([[1], []], pad_id=0)

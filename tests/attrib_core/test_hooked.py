"""Per-example gradients from module hooks in one batched pass, against a plain loop of autograd calls.

The oracle presents each example alone to the loss (a batch of one) and calls
``torch.autograd.grad``; the hooked gradients come from one forward and one backward
of the whole batch. Models cover every module rule (Linear, Conv2d, Embedding with a
padding row, LayerNorm with and without bias, nn.RMSNorm, a weight tied between an
embedding and an output layer) and the Hugging Face architectures built from their
configs (GPT-2's Conv1D and position embedding shared by the batch, Llama's RMSNorm in
float32 and rotary embeddings, a BERT classifier).
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from attrib_core import lm, per_sample_grad_loop
from attrib_core.hooked import UncoveredParameters, hooked_grads, hooked_layout

V, T, D = 11, 6, 5


class Tied(nn.Module):
    """Embedding (padding row 0) -> LayerNorm -> Conv2d over (D, T) -> RMSNorm -> output layer tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=0)
        self.norm = nn.LayerNorm(D)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.rms = nn.RMSNorm(D, eps=1e-6)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, V, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = self.norm(self.embed(ids))
        h = h + self.conv(h.unsqueeze(1)).squeeze(1)
        return self.out(torch.tanh(self.mix(self.rms(h))))


def each_loss(model):
    def f_each(params, ids):
        logits = functional_call(model, params, (ids,))
        return lm.sequence_losses(logits, torch.where(ids > 0, ids, lm.IGNORE_INDEX))

    return f_each


def looped(model, f_each, params, batch):
    return per_sample_grad_loop(lambda p, b: f_each(p, b).sum())(params, batch)


def test_every_module_rule_and_a_tied_weight_equal_the_loop():
    torch.manual_seed(0)
    model = Tied().double().eval()
    ids = torch.randint(1, V, (5, T))
    ids[1, 4:] = 0  # padding
    params = {k: v.detach() for k, v in model.named_parameters()}
    layout = hooked_layout(model, list(params))
    assert {m.module for m in layout.modules} == {"embed", "norm", "conv", "rms", "mix", "out"}
    got = hooked_grads(model, each_loss(model), params, ids, layout)
    torch.testing.assert_close(got, looped(model, each_loss(model), params, ids), rtol=1e-10, atol=1e-12)


def test_a_subset_of_parameters_in_the_given_order():
    torch.manual_seed(1)
    model = Tied().double().eval()
    ids = torch.randint(1, V, (3, T))
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = ["rms.weight", "embed.weight", "norm.bias"]
    got = hooked_grads(model, each_loss(model), params, ids, hooked_layout(model, names))
    full = looped(model, each_loss(model), params, ids)
    offsets, start = {}, 0
    for n, v in params.items():
        offsets[n] = slice(start, start + v.numel())
        start += v.numel()
    torch.testing.assert_close(got, torch.cat([full[:, offsets[n]] for n in names], dim=1))


class Raw(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.linear(x) * self.scale


def test_parameters_without_a_rule_are_named_with_their_share():
    model = Raw()
    with pytest.raises(UncoveredParameters, match=r"1 parameters \(20.0% of the attributed entries\).*scale"):
        hooked_layout(model, ["linear.weight", "linear.bias", "scale"])
    assert [m.module for m in hooked_layout(model, ["linear.weight"]).modules] == ["linear"]
    with pytest.raises(ValueError, match="not parameters of the model"):
        hooked_layout(model, ["nope"])


def test_one_loss_per_example_is_required():
    model = Raw().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    layout = hooked_layout(model, ["linear.weight"])
    with pytest.raises(ValueError, match=r"f_each: expected one loss per example, shape \(4,\)"):
        hooked_grads(model, lambda p, x: functional_call(model, p, (x,)).sum(), params,
                     torch.randn(4, 3, dtype=torch.float64), layout)


def test_sequence_losses_reject_an_example_without_scored_tokens():
    logits = torch.randn(3, 4, V)
    labels = torch.randint(0, V, (3, 4))
    labels[2, 1:] = lm.IGNORE_INDEX  # only the first label, which the shift drops
    with pytest.raises(ValueError, match=r"examples \[2\] of the batch have no scored token"):
        lm.sequence_losses(logits, labels)


def test_token_margins_are_log_odds_of_the_label():
    torch.manual_seed(2)
    logits = torch.randn(2, 5, V, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 5))
    margins, valid = lm.token_margins(logits, labels)
    p = torch.softmax(logits[:, :-1], -1).gather(-1, labels[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(margins, torch.log(p / (1 - p)))
    assert bool(valid.all())


transformers = pytest.importorskip("transformers")


def _batch(n=4, length=10, vocab=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    lengths = torch.randint(3, length + 1, (n,), generator=g)
    lengths[0] = length
    mask = (torch.arange(length) < lengths[:, None]).long()
    ids = ids * mask
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, lm.IGNORE_INDEX)}


def _hf(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=24, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                         bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(config)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                          bos_token_id=0, eos_token_id=0, pad_token_id=0)
        return transformers.LlamaForCausalLM(config)
    config = transformers.BertConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0)
    return transformers.BertForSequenceClassification(config)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_hugging_face_models_from_configs_equal_the_loop(kind):
    from attrib_torch.lm import CausalLMLoss, SequenceClassificationLoss

    model = _hf(kind).double().eval()
    batch = _batch()
    if kind == "bert":
        batch["labels"] = torch.tensor([0, 1, 2, 1])
        loss = SequenceClassificationLoss(model)
    else:
        loss = CausalLMLoss(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    layout = hooked_layout(model, list(params))  # every parameter has a rule
    got = hooked_grads(model, loss.per_example, params, batch, layout)
    torch.testing.assert_close(got, per_sample_grad_loop(loss)(params, batch), rtol=1e-9, atol=1e-12)

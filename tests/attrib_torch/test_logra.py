"""LoGraAttributor against independent oracles: Grad-Dot at full rank, an explicit preconditioned solve,
per-token rows that sum to the sequence's score, and scores that padding and batching do not move."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader

from attrib_core import compress_gradient, compression, layer_specs, per_sample_grad_loop
from attrib_torch import AttributionTask, LoGraAttributor, TracInAttributor

V, D, T = 9, 6, 5


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.out = nn.Linear(D, V)

    def forward(self, ids):
        return self.out(torch.tanh(self.mix(self.embed(ids))))


def token_model():
    torch.manual_seed(0)
    return Tokens().double().eval()


def next_token_loss(model):
    def f(params, batch):
        (ids,) = batch
        logits = functional_call(model, params, (ids,))
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))

    return f


def id_loader(n, seed, batch_size):
    ids = torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))
    return DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size)


def quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make()


def test_full_rank_without_preconditioner_is_grad_dot():
    model = token_model()
    task = AttributionTask(next_token_loss(model), model, model.state_dict())
    train, test = id_loader(10, 1, 4), id_loader(3, 2, 3)
    logra = quiet(lambda: LoGraAttributor(task, rank=64, preconditioner="identity", show_progress=False))
    grad_dot = TracInAttributor(task, [1.0], False, show_progress=False)
    torch.testing.assert_close(logra.attribute(train, test), grad_dot.attribute(train, test))


@pytest.mark.parametrize("kind", ["logra", "factgrass"])
def test_fisher_preconditioned_scores_equal_an_explicit_solve(kind):
    model = token_model()
    loss = next_token_loss(model)
    task = AttributionTask(loss, model, model.state_dict())
    train, test = id_loader(12, 3, 5), id_loader(4, 4, 4)
    attributor = LoGraAttributor(task, rank=3, kind=kind, damping=0.1, seed=7, show_progress=False)
    scores = attributor.attribute(train, test)
    params = {k: v.detach() for k, v in model.named_parameters()}
    specs = layer_specs(model, params, None)
    comp, _ = compression(specs, 3, kind=kind, seed=7)

    def compressed(loader):  # explicit autograd gradients, compressed module by module
        x = torch.cat([b[0] for b in loader])
        dense = per_sample_grad_loop(loss)(params, (x,))
        blocks, start = [], 0
        for name, p in params.items():
            blocks.append(dense[:, start : start + p.numel()])
            start += p.numel()
        by_name = dict(zip(params, blocks))
        return [compress_gradient(torch.cat([by_name[n] for n in (s.weight, s.bias) if n], 1), s, comp)
                for s in specs]

    G, Q = compressed(train), compressed(test)
    expected = 0
    for g, q in zip(G, Q):
        F = g.T @ g / g.shape[0]
        damping = 0.1 * float(torch.linalg.eigvalsh(F).clamp(min=0).mean())
        expected = expected + g @ torch.linalg.solve(F + damping * torch.eye(F.shape[0], dtype=F.dtype), q.T)
    torch.testing.assert_close(scores, expected)


def test_ekfac_preconditioner_equals_a_dense_ekfac_of_explicitly_projected_factors():
    """The oracle: factors from attrib_core.capture, projected by the explicit Rademacher matrices, EK-FAC built as a
    dense (k_out k_in)² matrix per module from its own eigendecompositions, and solved."""
    from attrib_core import capture, side_seed
    from kernels import projection_entries

    model = token_model()
    loss = next_token_loss(model)
    task = AttributionTask(loss, model, model.state_dict())
    train, test = id_loader(12, 3, 5), id_loader(4, 4, 4)
    rank, seed = 3, 7
    scores = LoGraAttributor(task, rank=rank, preconditioner="ekfac", damping=0.1, seed=seed,
                             show_progress=False).attribute(train, test)
    params = {k: v.detach() for k, v in model.named_parameters()}
    specs = layer_specs(model, params, None)

    def projected(loader):  # per module: compressed ds (n, T, k) and a (n, T, k)
        out = {s.module: ([], []) for s in specs}
        for (ids,) in loader:
            captured = capture(model, loss, params, (ids,), specs, reduction="mean")
            for s in specs:
                R_in = projection_entries(s.d_a, rank, seed=side_seed(seed, s.module, "in")).double()
                R_out = projection_entries(s.d_out, rank, seed=side_seed(seed, s.module, "out")).double()
                out[s.module][0].append(captured[s.module].ds @ R_out)
                out[s.module][1].append(captured[s.module].a @ R_in)
        return {m: (torch.cat(ds), torch.cat(a)) for m, (ds, a) in out.items()}

    P_train, P_test = projected(train), projected(test)
    expected = 0
    for s in specs:
        ds, a = P_train[s.module]
        G = torch.einsum("ntk,ntl->nkl", ds, a).reshape(len(ds), -1)
        Q = torch.einsum("ntk,ntl->nkl", *P_test[s.module]).reshape(len(P_test[s.module][0]), -1)
        QS = torch.linalg.eigh(torch.einsum("ntk,ntl->kl", ds, ds))[1]
        QA = torch.linalg.eigh(torch.einsum("ntk,ntl->kl", a, a))[1]
        basis = torch.kron(QS, QA)
        corrected = ((G @ basis) ** 2).mean(0)
        F = basis @ torch.diag(corrected) @ basis.T
        damping = 0.1 * float(corrected.mean())
        expected = expected + G @ torch.linalg.solve(F + damping * torch.eye(len(F), dtype=F.dtype), Q.T)
    torch.testing.assert_close(scores, expected)


def test_normalized_at_full_rank_is_grad_cos():
    model = token_model()
    task = AttributionTask(next_token_loss(model), model, model.state_dict())
    train, test = id_loader(8, 5, 3), id_loader(3, 6, 3)
    logra = quiet(lambda: LoGraAttributor(task, rank=64, preconditioner="identity", normalize=True,
                                          show_progress=False))
    grad_cos = TracInAttributor(task, [1.0], normalized_grad=True, show_progress=False)
    torch.testing.assert_close(logra.attribute(train, test), grad_cos.attribute(train, test))


def test_second_moments_divide_the_gradients_before_compression():
    """Rank-one moments (Adafactor's form), so the factors' scaling is exact: the oracle divides dense gradients."""
    model = token_model()
    loss = next_token_loss(model)
    task = AttributionTask(loss, model, model.state_dict())
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = torch.Generator().manual_seed(9)
    moments = {}
    for spec in layer_specs(model, params, None):
        rows = torch.rand(spec.d_out, generator=g, dtype=torch.float64) + 0.5
        cols = torch.rand(spec.d_a, generator=g, dtype=torch.float64) + 0.5
        v = torch.outer(rows, cols)
        weight = v[:, : spec.d_in]
        moments[spec.weight] = (weight.T if spec.transposed else weight).contiguous()
        if spec.bias is not None:
            moments[spec.bias] = v[:, spec.d_in].clone()
    train, test = id_loader(7, 7, 4), id_loader(2, 8, 2)
    logra = quiet(lambda: LoGraAttributor(task, rank=64, preconditioner="identity", second_moments=moments,
                                          show_progress=False))
    scale = torch.cat([moments[n].reshape(-1) for n in logra.names]).rsqrt()

    def scaled(loader):
        x = torch.cat([b[0] for b in loader])
        dense = per_sample_grad_loop(loss)(params, (x,))
        return dense * scale

    torch.testing.assert_close(logra.attribute(train, test), scaled(train) @ scaled(test).T, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="second_moments: no entry"):
        LoGraAttributor(task, rank=2, second_moments={"mix.weight": moments["mix.weight"]}, show_progress=False)


def test_bad_arguments_are_named():
    model = token_model()
    task = AttributionTask(next_token_loss(model), model, model.state_dict())
    for kwargs, match in (({"rank": 0}, "rank"), ({"kind": "grass"}, "kind"), ({"preconditioner": "kfac"},
                                                                                   "preconditioner"),
                          ({"damping": -1.0}, "damping"), ({"module_name": "nope"}, "not modules")):
        with pytest.raises((ValueError, TypeError), match=match):
            LoGraAttributor(task, show_progress=False, **kwargs)


def test_a_weight_read_outside_its_layer_is_refused():
    model = token_model()
    base = next_token_loss(model)

    def penalised(params, batch):
        return base(params, batch) + 0.1 * params["mix.weight"].pow(2).sum()

    task = AttributionTask(penalised, model, model.state_dict())
    with pytest.raises(ValueError, match="differ from autograd's on the first examples"):
        LoGraAttributor(task, rank=3, show_progress=False).attribute(id_loader(4, 1, 4), id_loader(2, 2, 2))


transformers = pytest.importorskip("transformers")
from tests.attrib_torch.test_hf_models import Sequences, gpt2, lm_loss  # noqa: E402

from attrib_torch import CausalLMLoss, IFAttributorEKFAC  # noqa: E402


def _padded(dataset, extra):
    """The same sequences with ``extra`` more padding positions."""
    class Padded(torch.utils.data.Dataset):
        def __len__(self):
            return len(dataset)

        def __getitem__(self, i):
            row = dataset[i]
            return {"input_ids": torch.cat([row["input_ids"], torch.zeros(extra, dtype=torch.long)]),
                    "attention_mask": torch.cat([row["attention_mask"], torch.zeros(extra, dtype=torch.long)]),
                    "labels": torch.cat([row["labels"], torch.full((extra,), -100)])}

    return Padded()


ATTRIBUTORS = {
    "logra": lambda task: LoGraAttributor(task, rank=4, show_progress=False),
    "factgrass": lambda task: LoGraAttributor(task, rank=4, kind="factgrass", show_progress=False),
    "ekfac": lambda task: IFAttributorEKFAC(task, damping="heuristic", show_progress=False),
    "grad-dot": lambda task: TracInAttributor(task, [1.0], False, show_progress=False),
}


@pytest.mark.parametrize("name", sorted(ATTRIBUTORS))
def test_gpt2_scores_do_not_depend_on_padding_or_batching(name):
    model = gpt2()
    train_data, test_data = Sequences(8, 11), Sequences(3, 12)
    out = []
    for extra, batch_size in ((0, 4), (4, 3)):
        task = AttributionTask(CausalLMLoss(model), model, {k: v.clone() for k, v in model.state_dict().items()})
        attributor = quiet(lambda: ATTRIBUTORS[name](task))
        train = DataLoader(_padded(train_data, extra), batch_size=batch_size)
        test = DataLoader(_padded(test_data, extra), batch_size=2)
        if name == "ekfac":
            attributor.cache(train)
        out.append(attributor.attribute(train, test))
    torch.testing.assert_close(out[0], out[1], rtol=1e-7, atol=1e-9)


def test_gpt2_per_token_rows_sum_to_the_sequence_scores_and_skip_padding():
    model = gpt2()
    task = AttributionTask(CausalLMLoss(model), model, model.state_dict())
    train_data = Sequences(7, 13)
    train, test = DataLoader(train_data, batch_size=3), DataLoader(Sequences(2, 14), batch_size=2)
    attributor = quiet(lambda: LoGraAttributor(task, rank=4, show_progress=False))
    scores = attributor.attribute(train, test)
    tokens = attributor.attribute_tokens(train, test)
    lengths = torch.stack([train_data[i]["attention_mask"].sum() for i in range(7)])
    assert torch.equal(tokens.offsets[1:] - tokens.offsets[:-1], lengths)
    assert tokens.scores.shape == (int(lengths.sum()), 2)
    for i in range(7):
        assert torch.equal(tokens.positions[tokens.offsets[i] : tokens.offsets[i + 1]], torch.arange(int(lengths[i])))
        torch.testing.assert_close(tokens.sequence(i).sum(0), scores[i])


def test_hugging_faces_own_loss_is_explained_not_looped():
    model = gpt2()
    task = AttributionTask(lm_loss(model), model, model.state_dict())
    attributor = quiet(lambda: LoGraAttributor(task, rank=4, show_progress=False))
    with pytest.raises(ValueError, match="CausalLMLoss"):
        attributor.attribute(DataLoader(Sequences(4, 1), batch_size=2), DataLoader(Sequences(2, 2), batch_size=2))


def test_gpt2_at_full_rank_is_grad_dot_with_the_tied_embedding_included():
    model = gpt2()
    task = AttributionTask(CausalLMLoss(model), model, model.state_dict())
    train, test = DataLoader(Sequences(6, 15), batch_size=3), DataLoader(Sequences(2, 16), batch_size=2)
    logra = quiet(lambda: LoGraAttributor(task, rank=1000, preconditioner="identity", show_progress=False))
    assert "transformer.wte.weight" in logra.names  # tied to lm_head: compressed once, both layers' parts added
    assert logra.compression.members["transformer.wte"] == (("transformer.wte", False), ("lm_head", True))
    grad_dot = TracInAttributor(task, [1.0], False, layer_name=logra.names, show_progress=False)
    torch.testing.assert_close(logra.attribute(train, test), grad_dot.attribute(train, test))


def _llama():
    config = transformers.LlamaConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double().eval()


def _bert_classifier():
    config = transformers.BertConfig(vocab_size=24, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, max_position_embeddings=16, num_labels=3, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).double().eval()


class Labelled(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = dict(self.data[i])
        row["labels"] = torch.tensor(i % 3)
        return row


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_other_architectures_at_full_rank_are_grad_dot(arch):
    from attrib_torch import SequenceClassificationLoss

    model = _llama() if arch == "llama" else _bert_classifier()
    loss = CausalLMLoss(model) if arch == "llama" else SequenceClassificationLoss(model)
    wrap = (lambda d: d) if arch == "llama" else Labelled
    task = AttributionTask(loss, model, model.state_dict())
    train = DataLoader(wrap(Sequences(6, 17)), batch_size=3)
    test = DataLoader(wrap(Sequences(2, 18)), batch_size=2)
    logra = quiet(lambda: LoGraAttributor(task, rank=1000, preconditioner="identity", show_progress=False))
    grad_dot = TracInAttributor(task, [1.0], False, layer_name=logra.names, show_progress=False)
    torch.testing.assert_close(logra.attribute(train, test), grad_dot.attribute(train, test))


@pytest.mark.parametrize("kind", ["logra", "factgrass"])
def test_a_vocabulary_beyond_one_hot_size_is_compressed_from_the_ids(kind):
    """GPT-2 with 8,200 tokens (more rows than a one-hot factor is built for): the tied embedding is covered, and the
    scores are the inner products of autograd's gradients compressed explicitly."""
    from attrib_core import MAX_EMBEDDING_ROWS

    vocab = MAX_EMBEDDING_ROWS + 8
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=8, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    loss = CausalLMLoss(model)
    task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
    train_data, test_data = Sequences(5, 21), Sequences(2, 22)
    for data in (train_data, test_data):  # ids across the whole vocabulary
        data.ids = torch.randint(1, vocab, data.ids.shape, generator=torch.Generator().manual_seed(5)) * data.mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # wpe, norms: left out, named
        logra = LoGraAttributor(task, rank=3, kind=kind, preconditioner="identity", show_progress=False)
    assert "transformer.wte.weight" in logra.names
    scores = logra.attribute(DataLoader(train_data, batch_size=3), DataLoader(test_data, batch_size=2))
    params = {k: v.detach() for k, v in model.named_parameters()}
    chosen = {n: params[n] for n in logra.names}
    specs = {s.module: s for s in logra._specs}

    def compressed(data):
        batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask",
                                                                                  "labels")}
        dense = per_sample_grad_loop(lambda c, b: loss({**params, **c}, b))(chosen, batch)
        offsets = dict(zip(chosen, torch.tensor([0] + [p.numel() for p in chosen.values()]).cumsum(0).tolist()))
        parts = []
        for block in logra.compression.members:
            spec = specs[block]
            G = torch.cat([dense[:, offsets[n] : offsets[n] + params[n].numel()] for n in (spec.weight, spec.bias)
                           if n], 1)
            parts.append(compress_gradient(G, spec, logra.compression))
        return torch.cat(parts, 1)

    torch.testing.assert_close(scores, compressed(train_data) @ compressed(test_data).T)

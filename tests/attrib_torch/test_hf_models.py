"""Hugging Face models built from their configs (no weights downloaded), with dict batches.

The oracle for GPT-2's ``Conv1D`` layers is the same model with every ``Conv1D``
converted to the ``nn.Linear`` it stands for (weight transposed), as kronfluence's
GPT-2 example does: the two compute the same function, so every attribution must
agree, whatever the layers' storage.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from attrib_torch import AttributionTask, IFAttributorEKFAC, TracInAttributor
from attrib_torch.lm import CausalLMLoss

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, LENGTH = 24, 10


def gpt2(seed=0):
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).double().eval()


def conv1d_as_linear(model):
    """A copy with every Conv1D replaced by the nn.Linear it computes."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, Conv1D):
            nx, nf = module.weight.shape
            linear = nn.Linear(nx, nf).double()
            with torch.no_grad():
                linear.weight.copy_(module.weight.T)
                linear.bias.copy_(module.bias)
            twin.set_submodule(name, linear)
    return twin


class Sequences(Dataset):
    """Token sequences of varied lengths, right-padded; labels -100 at the padding."""

    def __init__(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        self.ids = self.ids * self.mask

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = torch.where(self.mask[i].bool(), self.ids[i], torch.full_like(self.ids[i], -100))
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def lm_loss(model):
    def f(params, batch):
        return functional_call(model, params, args=(), kwargs=dict(batch)).loss

    return f


def test_ekfac_on_gpt2_equals_ekfac_on_its_linear_twin_and_names_what_it_leaves_out():
    model = gpt2()
    twin = conv1d_as_linear(model)
    train = DataLoader(Sequences(12, 1), batch_size=4)
    test = DataLoader(Sequences(3, 2), batch_size=3)
    scores = {}
    for key, m in (("gpt2", model), ("twin", twin)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            attributor = IFAttributorEKFAC(AttributionTask(CausalLMLoss(m), m, {k: v.clone() for k, v in
                                                                            m.state_dict().items()}),
                                           damping=1e-3, show_progress=False)
        messages = [str(w.message) for w in caught if "IFAttributorEKFAC" in str(w.message)]
        assert len(messages) == 1
        assert "ln_1.weight" in messages[0] and "% of all entries" in messages[0]
        assert "tied to that of ['lm_head']" in messages[0]
        attributor.cache(train)
        scores[key] = attributor.attribute(train, test)
    assert scores["gpt2"].shape == (12, 3) and bool(torch.isfinite(scores["gpt2"]).all())
    torch.testing.assert_close(scores["gpt2"], scores["twin"])


def test_tracin_on_gpt2_equals_tracin_on_its_linear_twin():
    model = gpt2()
    twin = conv1d_as_linear(model)
    train = DataLoader(Sequences(6, 3), batch_size=3)
    test = DataLoader(Sequences(2, 4), batch_size=2)
    out = []
    for m in (model, twin):
        task = AttributionTask(CausalLMLoss(m), m, {k: v.clone() for k, v in m.state_dict().items()})
        out.append(TracInAttributor(task, [1.0], False, show_progress=False).attribute(train, test))
    torch.testing.assert_close(out[0], out[1])


def test_tracin_on_gpt2_takes_gradients_from_hooks_equal_to_the_loop():
    from attrib_core.hooked import HookedLayout

    model = gpt2()
    train = DataLoader(Sequences(6, 3), batch_size=3)
    test = DataLoader(Sequences(2, 4), batch_size=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooked = TracInAttributor(AttributionTask(CausalLMLoss(model), model, state), [1.0], False, show_progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hooked path is silent: as exact as vmap, not slower
        scores = hooked.attribute(train, test)
    assert isinstance(hooked._gradients._paths["loss_func"], HookedLayout)
    with pytest.warns(UserWarning, match="no per_example"):  # HF's own .loss: the loop
        looped = TracInAttributor(AttributionTask(lm_loss(model), model, state), [1.0], False,
                                  show_progress=False).attribute(train, test)
    torch.testing.assert_close(scores, looped)


def test_a_per_example_loss_that_is_not_the_batch_of_one_loss_falls_back_to_the_loop():
    model = gpt2()
    wrong = CausalLMLoss(model, reduction="sum")  # per_example sums tokens, the batch loss below averages them
    hf_mean = lm_loss(model)

    def loss(params, batch):
        return hf_mean(params, batch)

    loss.per_example = wrong.per_example
    task = AttributionTask(loss, model, {k: v.clone() for k, v in model.state_dict().items()})
    with pytest.warns(UserWarning, match="differ from autograd's on the first examples"):
        TracInAttributor(task, [1.0], False, show_progress=False).self_attribute(DataLoader(Sequences(4, 5),
                                                                                            batch_size=4))


def test_causal_lm_loss_rejects_bad_batches_before_the_model_runs():
    model = gpt2()
    loss = CausalLMLoss(model)
    params = dict(model.named_parameters())
    batch = Sequences(3, 6)[0]
    batch = {k: v.unsqueeze(0) for k, v in batch.items()}
    with pytest.raises(TypeError, match="expected a dict with 'input_ids'"):
        loss(params, (batch["input_ids"],))
    too_long = {"input_ids": torch.ones(1, 17, dtype=torch.long)}
    with pytest.raises(ValueError, match="17 tokens, longer than the model's 16 positions"):
        loss(params, too_long)
    unmasked_pad = dict(batch, labels=batch["input_ids"].clone())
    if bool(batch["attention_mask"].all()):
        unmasked_pad["attention_mask"] = batch["attention_mask"].clone()
        unmasked_pad["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match=r"examples \[0\] score tokens where attention_mask is 0"):
        loss(params, unmasked_pad)
    with pytest.raises(ValueError, match="reduction"):
        CausalLMLoss(model, reduction="max")
    with pytest.raises(ValueError, match="target"):
        CausalLMLoss(model, target="logit")


def test_causal_lm_loss_of_one_sequence_is_hugging_faces_loss():
    model = gpt2()
    params = dict(model.named_parameters())
    data = Sequences(4, 7)
    for i in range(4):
        one = {k: v.unsqueeze(0) for k, v in data[i].items()}
        torch.testing.assert_close(CausalLMLoss(model)(params, one), lm_loss(model)(params, one).double())


def test_hessian_attributors_explain_fused_attention_and_run_with_eager_attention():
    from attrib_torch import IFAttributorArnoldi, IFAttributorCG, IFAttributorDataInf, TRAKAttributor

    train, test = DataLoader(Sequences(6, 21), batch_size=3), DataLoader(Sequences(2, 22), batch_size=2)
    fused = gpt2()
    task = AttributionTask(CausalLMLoss(fused), fused, {k: v.clone() for k, v in fused.state_dict().items()})
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        IFAttributorCG(task, max_iter=3, regularization=1e-2, show_progress=False).attribute(train, test)
    config = fused.config
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    eager = transformers.GPT2LMHeadModel(config).double().eval()
    task = AttributionTask(CausalLMLoss(eager), eager, {k: v.clone() for k, v in eager.state_dict().items()})
    loss = CausalLMLoss(eager)
    makers = {"cg": lambda: IFAttributorCG(task, max_iter=3, regularization=1e-2, show_progress=False),
              "arnoldi": lambda: IFAttributorArnoldi(task, proj_dim=4, max_iter=8, show_progress=False),
              "datainf": lambda: IFAttributorDataInf(task, show_progress=False),
              "trak": lambda: TRAKAttributor(task, loss.probabilities, show_progress=False)}
    for name, make in makers.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributor = make()
            attributor.cache(train)
            scores = attributor.attribute(test, train) if name == "trak" else attributor.attribute(train, test)
        assert scores.shape == (6, 2) and bool(torch.isfinite(scores).all()), name


def test_query_tokens_score_each_token_against_autograd_and_add_up_to_the_sequence():
    from attrib_torch import LoGraAttributor, QueryTokens

    model = gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_set, queries = Sequences(5, 11), Sequences(3, 12)
    tokens = QueryTokens(queries)
    lengths = queries.mask.sum(1)
    assert tokens.offsets.tolist() == [0, *(lengths - 1).cumsum(0).tolist()]  # positions 1 .. length-1
    assert tokens.index[: int(lengths[0]) - 1, 1].tolist() == list(range(1, int(lengths[0])))
    train = DataLoader(train_set, batch_size=3)
    task = AttributionTask(CausalLMLoss(model), model, state, target_func=CausalLMLoss(model, reduction="sum"))
    per_token = TracInAttributor(task, [1.0], False, show_progress=False).attribute(
        train, DataLoader(tokens, batch_size=4))
    # the oracle: autograd of each token's cross-entropy written out, each sequence alone (in float64: HF's own
    # .loss upcasts only to float32)
    params = dict(model.named_parameters())

    def token_loss(item, t):
        logits = model(input_ids=item["input_ids"][None], attention_mask=item["attention_mask"][None]).logits
        return -torch.log_softmax(logits[0, t - 1], -1)[item["input_ids"][t]]

    def gradient(loss):
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(params.values()))])

    g_train = torch.stack([gradient(sum(token_loss(item, t) for t in range(1, n)) / (n - 1))
                           for item, n in ((train_set[i], int(train_set.mask[i].sum())) for i in range(5))])
    expected = torch.stack([gradient(token_loss(queries[i], t)) for i, t in tokens.index.tolist()])
    torch.testing.assert_close(per_token, g_train @ expected.T)
    # linear in the target's gradient: a sequence's token columns add up to its summed-loss column
    for attributor in (TracInAttributor(task, [1.0], False, show_progress=False),
                       LoGraAttributor(task, rank=3, show_progress=False)):
        whole = attributor.attribute(train, DataLoader(queries, batch_size=3))
        split = attributor.attribute(train, DataLoader(tokens, batch_size=5))
        summed = torch.stack([split[:, a:b].sum(1) for a, b in zip(tokens.offsets[:-1], tokens.offsets[1:])], 1)
        torch.testing.assert_close(summed, whole)


def test_query_tokens_reject_a_sequence_without_scored_tokens():
    from attrib_torch import QueryTokens

    queries = [{"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor([3, 4, 5])},
               {"input_ids": torch.tensor([3, 4, 5]), "labels": torch.tensor([3, -100, -100])}]
    with pytest.raises(ValueError, match="sequence 1 has no scored token"):
        QueryTokens(queries)
    with pytest.raises(TypeError, match=r"dataset\[0\]"):
        QueryTokens([(torch.tensor([1, 2]), 0)])
    assert QueryTokens(queries[:1]).index.tolist() == [[0, 1], [0, 2]]


def test_ekfac_query_rank_scores_low_rank_preconditioned_queries():
    from attrib_core import per_sample_grad_loop

    model = gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = DataLoader(Sequences(6, 31), batch_size=3), DataLoader(Sequences(3, 32), batch_size=3)
    runs = {}
    for rank in (None, 1, 64):
        task = AttributionTask(CausalLMLoss(model), model, state)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            attributor = IFAttributorEKFAC(task, damping="heuristic", query_rank=rank, show_progress=False)
        attributor.cache(train)
        runs[rank] = (attributor, attributor.attribute(train, test))
    torch.testing.assert_close(runs[64][1], runs[None][1])  # rank above every layer's: exact
    attributor, low = runs[1]
    fit = attributor._fits[0]
    params = {k: v.detach() for k, v in model.named_parameters()}
    chosen = {n: params[n] for n in fit.names}
    loss = CausalLMLoss(model)

    def gradients(loader):
        batch = {k: torch.cat([b[k] for b in loader]) for k in ("input_ids", "attention_mask", "labels")}
        return per_sample_grad_loop(lambda c, b: loss({**params, **c}, b))(chosen, batch)

    queries = fit.low_rank(fit.solve(gradients(test), damping=fit.heuristic_damping()).x, 1)
    torch.testing.assert_close(low, gradients(train) @ queries.T)
    assert not torch.allclose(low, runs[None][1])
    with pytest.raises((TypeError, ValueError), match="query_rank"):
        IFAttributorEKFAC(AttributionTask(CausalLMLoss(model), model, state), query_rank=0)


def test_tracin_on_gpt2_keeps_gradients_factored_where_cheaper_checked_against_autograd():
    """Short sequences through wide MLP layers: the factored inner products cost less than the gradients, so the
    cost model takes them, from hooks (vmap cannot trace GPT-2); the scores equal explicit autograd gradients'."""
    from attrib_core import per_sample_grad_loop

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=8, n_embd=32, n_layer=1, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(3)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(4)
    examples = [{"input_ids": ids, "attention_mask": torch.ones(4, dtype=torch.long), "labels": ids}
                for ids in torch.randint(0, VOCAB, (7, 4), generator=g)]
    train, test = DataLoader(examples[:5], batch_size=3), DataLoader(examples[5:], batch_size=2)
    names = [n for n, _ in model.named_parameters() if ".mlp." in n]  # c_fc, c_proj: 32 <-> 128 wide, 4 tokens
    task = AttributionTask(CausalLMLoss(model), model, {k: v.clone() for k, v in model.state_dict().items()})
    attributor = TracInAttributor(task, [1.0], False, layer_name=names, show_progress=False)
    scores = attributor.attribute(train, test)
    assert attributor._factored and {s.module for s in attributor._factored} == {
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"}
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss = CausalLMLoss(model)

    def gradients(batch):
        return per_sample_grad_loop(lambda c, b: loss({**params, **c}, b))({n: params[n] for n in names}, batch)

    stack = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    torch.testing.assert_close(scores, gradients(stack(examples[:5])) @ gradients(stack(examples[5:])).T)

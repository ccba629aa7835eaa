"""Training-time capture: each recorded row is its example's share of the step's gradient (a loop of
torch.autograd.grad, compressed), the training itself is unchanged, TracIn over the recorded segments equals its
definition, and a Hugging Face Trainer records through the callback."""

import contextlib
import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from attrib_core import compress_parameter_gradients
from attrib_torch import AttributionTask, GradientRecorder, LoGraAttributor, attribute_recorded
from attrib_torch.store import FeatureStore, StoreCorrupted
from tests.helpers import params_of, small_mlp

RANK, SEED, LR = (2, 3), 4, 0.1


def compressed(recorder, grads):
    """``(n, width)``: explicit gradients ``{name: (n, *shape)}`` compressed block by block as the recorder does."""
    return compress_parameter_gradients(grads, recorder._specs, recorder.compression)


def shares(model, params, share_losses):
    """``{name: (n, *shape)}``: the gradient of each of ``share_losses(params) -> (n,)``, one autograd call each."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    values = share_losses(leaves)
    grads = [torch.autograd.grad(values[i], list(leaves.values()), retain_graph=True, allow_unused=True)
             for i in range(len(values))]
    return {k: torch.stack([torch.zeros_like(leaves[k]) if g[j] is None else g[j] for g in grads])
            for j, k in enumerate(leaves)}


def rows_by_step(store):
    steps = store.column("step")
    rows = store.rows().double()
    return {int(s): rows[steps == s] for s in steps.unique()}


def train_mlp(tmp_path, record):
    model = small_mlp(0, (5, 7, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (10,), generator=g)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    log, states = [], []
    recorder = GradientRecorder(model, tmp_path / "grads", rank=RANK, seed=SEED) if record else None
    with recorder if record else contextlib.nullcontext():
        for epoch in range(2):
            for idx in torch.randperm(10, generator=g).split(4):
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                log.append((idx, params_of(model), {n: p.grad.clone() for n, p in model.named_parameters()}))
                if record:
                    recorder.step(idx, lr=optimizer.param_groups[0]["lr"])
                optimizer.step()
                optimizer.zero_grad()
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            if record:
                recorder.checkpoint()
    return model, (x, y), log, states, recorder


def test_each_row_is_its_examples_share_of_the_step_and_training_is_unchanged(tmp_path):
    plain, _, _, _, _ = train_mlp(tmp_path / "plain", record=False)
    model, (x, y), log, _, recorder = train_mlp(tmp_path / "rec", record=True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))  # the same training
    assert len(recorder.segments) == 2
    stores = [FeatureStore.open(p) for p in recorder.segments]
    steps = {**rows_by_step(stores[0]), **rows_by_step(stores[1])}
    assert len(steps) == len(log) == 6
    twin = copy.deepcopy(model)
    for step, (idx, params, batch_grad) in enumerate(log):
        def share_losses(p, idx=idx):  # example i's terms of the batch's mean loss
            out = functional_call(twin, p, (x[idx],))
            return nn.functional.cross_entropy(out, y[idx], reduction="none") / len(idx)

        expected = compressed(recorder, shares(twin, params, share_losses))
        torch.testing.assert_close(steps[step], expected, rtol=1e-5, atol=1e-7)  # stored in float32
        total = compressed(recorder, {n: g[None] for n, g in batch_grad.items()})[0]
        torch.testing.assert_close(steps[step].sum(0), total, rtol=1e-5, atol=1e-7)
    for epoch, store in enumerate(stores):
        assert sorted(store.column("index").tolist()) == list(range(10))  # every example once per epoch
        assert torch.equal(store.column("lr"), torch.full((10,), LR, dtype=torch.float64))


def test_tracin_over_recorded_segments_equals_its_definition(tmp_path):
    model, (x, y), log, states, recorder = train_mlp(tmp_path, record=True)
    stores = [FeatureStore.open(p) for p in recorder.segments]
    g = torch.Generator().manual_seed(9)
    test_x, test_y = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    twin = copy.deepcopy(model)

    def loss(params, batch):
        return nn.functional.cross_entropy(functional_call(twin, params, (batch[0],)), batch[1])

    task = AttributionTask(loss, twin, states)
    attributor = LoGraAttributor(task, rank=RANK, seed=SEED, preconditioner="identity", show_progress=False)
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=3)
    scores = attribute_recorded(attributor, stores, test, 10)
    expected = torch.zeros(10, 3, dtype=torch.float64)
    for step, (idx, params, _) in enumerate(log):
        epoch = step // 3
        rows = compressed(recorder, shares(twin, params, lambda p, idx=idx: nn.functional.cross_entropy(
            functional_call(twin, p, (x[idx],)), y[idx], reduction="none") / len(idx)))
        state = {k: v for k, v in states[epoch].items()}
        q = compressed(recorder, shares(twin, state, lambda p: nn.functional.cross_entropy(
            functional_call(twin, p, (test_x,)), test_y, reduction="none")))
        expected.index_add_(0, idx, LR * rows @ q.T)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-8)
    from attrib_torch.store import StoreMismatch

    with pytest.raises(StoreMismatch, match="its model"):
        attribute_recorded(LoGraAttributor(AttributionTask(loss, twin, states[::-1]), rank=RANK, seed=SEED,
                                           preconditioner="identity", show_progress=False), stores, test, 10)
    with pytest.raises(StoreMismatch, match="its seed"):
        attribute_recorded(LoGraAttributor(task, rank=RANK, seed=SEED + 1, preconditioner="identity",
                                           show_progress=False), stores, test, 10)
    with pytest.raises(ValueError, match="preconditioner='identity'"):
        attribute_recorded(LoGraAttributor(task, rank=RANK, seed=SEED, show_progress=False), stores, test, 10)


def test_recorder_misuse_is_named(tmp_path):
    model = small_mlp(0, (5, 7, 3))
    x = torch.randn(4, 5, dtype=torch.float64)
    with GradientRecorder(model, tmp_path / "a") as recorder:
        with pytest.raises(RuntimeError, match="no forward pass"):
            recorder.step()
        model(x).sum().backward()
        with pytest.raises(ValueError, match="indices"):
            recorder.step([0, 1])
        with torch.no_grad():
            model(x)  # evaluation: not recorded
        model(x).sum().backward()
        recorder.step()
    assert FeatureStore.open(tmp_path / "a" / "segment-00000").column("index").tolist() == [-1] * 4
    with pytest.raises(ValueError, match="not empty"):
        GradientRecorder(model, tmp_path / "a")
    with pytest.raises(ValueError, match="rows: row 0 .* not finite"):
        with GradientRecorder(model, tmp_path / "nan") as recorder:
            (model(x).sum() * float("nan")).backward()
            recorder.step()
    with pytest.raises(StoreCorrupted, match="not finished"):  # the segment being written stays unfinished
        FeatureStore.open(tmp_path / "nan" / "segment-00000")

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = nn.Linear(5, 5).double()

        def forward(self, x):
            return self.layer(self.layer(x))

    twice = Twice()
    with pytest.raises(RuntimeError, match="ran twice"):
        with GradientRecorder(twice, tmp_path / "b"):
            twice(x)
    with pytest.raises(RuntimeError, match="had no backward pass"):
        with GradientRecorder(model, tmp_path / "c") as recorder:
            model(x).sum().backward()
            model(x)  # an evaluation with gradients enabled
            recorder.step()

    class Pooled(nn.Module):  # a learned query through a Linear, summed over its leading dimension
        def __init__(self):
            super().__init__()
            self.query = nn.Parameter(torch.randn(1, 5, dtype=torch.float64))
            self.q = nn.Linear(5, 3).double()

        def forward(self, x):
            return x[:, :3] + self.q(self.query).sum(0)

    pooled = Pooled()
    with pytest.warns(UserWarning, match="query"):  # the parameter in no layer, named
        recorder = GradientRecorder(pooled, tmp_path / "d")
    with pytest.raises(RuntimeError, match="one output row for the whole batch"):
        with recorder:
            pooled(x)


def test_clipping_is_recorded_as_a_scale_and_other_changes_to_the_gradient_refused(tmp_path):
    model = small_mlp(0, (5, 7, 3))
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    with GradientRecorder(model, tmp_path / "a") as recorder:
        l1 = nn.functional.cross_entropy(model(x), y)
        l2 = model(x).pow(2).mean()  # a second loss, a second backward pass through its own forward pass
        l1.backward()
        l2.backward()
        norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01))
        recorder.step(list(range(6)) * 2, check_grads=True)  # two forward passes: each example twice
        model.zero_grad()
        out = model(x)
        (out.sum() + out.pow(2).sum()).backward(retain_graph=True)  # two backward passes through one forward
        out.mean().backward()
        recorder.step(list(range(6)), check_grads=True)
        nn.functional.cross_entropy(model(x), y).backward()
        model[0].weight.grad += 1.0  # not a scaling of the backward pass's gradient
        with pytest.raises(RuntimeError, match="not the backward pass's gradient times one factor"):
            recorder.step(list(range(6)), check_grads=True)
    single = small_mlp(0, (5, 7, 3), dtype=torch.float32)  # float32 rows: compared to float32's precision
    with GradientRecorder(single, tmp_path / "b") as other:
        nn.functional.cross_entropy(single(x.float()), y).backward()
        other.step(check_grads=True)
    assert torch.equal(FeatureStore.open(other.segments[0]).column("scale"), torch.ones(6, dtype=torch.float64))
    store = FeatureStore.open(recorder.segments[0])
    scales = store.column("scale")
    torch.testing.assert_close(scales[:12], torch.full((12,), 0.01 / norm, dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(scales[12:], torch.ones(6, dtype=torch.float64), rtol=1e-5, atol=0)


transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    from tests.attrib_torch.test_hf_models import VOCAB

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=8, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).double()


def test_a_language_models_rows_cover_tied_and_shared_embeddings(tmp_path):
    from tests.attrib_torch.test_hf_models import Sequences

    model = tiny_gpt2().train()
    data = Sequences(5, 3)
    batch = {k: torch.stack([data[i][k] for i in range(5)]) for k in ("input_ids", "attention_mask", "labels")}
    params = params_of(model)
    with pytest.warns(UserWarning, match="ln_1.weight"):  # the LayerNorms are in no compressed layer, named
        recorder = GradientRecorder(model, tmp_path / "g", rank=3)
    with recorder:
        model(**batch).loss.backward()
        recorder.step(list(range(5)))
    rows = FeatureStore.open(recorder.segments[0]).rows().double()

    def share_losses(p):  # each sequence's tokens' part of the batch's mean token loss
        logits = functional_call(model, p, (), {"input_ids": batch["input_ids"],
                                                "attention_mask": batch["attention_mask"]}).logits
        labels = batch["labels"][:, 1:]
        ce = nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        return ce.sum(1) / (labels != -100).sum()

    expected = compressed(recorder, shares(model, params, share_losses))
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-8)
    names = {s.module for s in recorder._specs}
    assert {"transformer.wte", "transformer.wpe", "lm_head"} <= names  # tied weight and the shared position row


@pytest.mark.filterwarnings("ignore:GradientRecorder:UserWarning")
def test_a_trainer_records_every_step_through_the_callback(tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from tests.attrib_torch.test_hf_models import Sequences

    class Indexed(torch.utils.data.Dataset):
        def __init__(self):
            self.base = Sequences(12, 5)

        def __len__(self):
            return len(self.base)

        def __getitem__(self, i):
            return {**self.base[i], "index": i}

    class Probe(TrainerCallback):
        """The compressed accumulated gradient and the learning rate at each optimizer step."""

        def __init__(self, recorder):
            self.recorder, self.grads, self.lrs = recorder, [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
            grads = {n: p.grad.detach().clone()[None] for n, p in model.named_parameters() if p.grad is not None}
            self.grads.append(compressed(self.recorder, grads)[0])
            self.lrs.append(optimizer.param_groups[0]["lr"])

    def run(record):
        model = tiny_gpt2()
        args = TrainingArguments(output_dir=str(tmp_path / f"out{record}"), per_device_train_batch_size=4,
                                 num_train_epochs=2, learning_rate=1e-2, max_grad_norm=0.05, report_to=[],
                                 save_strategy="no", remove_unused_columns=False, seed=3, use_cpu=True,
                                 logging_strategy="no", gradient_accumulation_steps=2, dataloader_num_workers=0)
        callbacks = []
        recorder = None
        if record:
            recorder = GradientRecorder(model, tmp_path / "grads", rank=3)
            callbacks = [recorder.trainer_callback(), Probe(recorder)]
        Trainer(model=model, args=args, train_dataset=Indexed(), callbacks=callbacks).train()
        return model, recorder, callbacks

    plain, _, _ = run(False)
    model, recorder, (_, probe) = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), model.parameters()))  # the same training
    stores = [FeatureStore.open(p) for p in recorder.segments]
    assert len(stores) == 2
    step = 0
    for store in stores:
        assert sorted(store.column("index").tolist()) == list(range(12))
        scales = store.column("scale")
        assert bool((scales < 1).all())  # max_grad_norm=0.05 clips every step: its factor is recorded
        for s, rows in rows_by_step(store).items():
            scale = float(scales[store.column("step") == s][0])
            torch.testing.assert_close(scale * rows.sum(0), probe.grads[s].double(), rtol=1e-5, atol=1e-8)
            step += 1
    assert step == len(probe.grads) == 4  # 12 examples, batches of 4, two accumulated per step, 2 epochs
    lrs = torch.cat([s.column("lr") for s in stores])
    steps = torch.cat([s.column("step") for s in stores])
    assert torch.equal(lrs, torch.tensor(probe.lrs, dtype=torch.float64)[steps])

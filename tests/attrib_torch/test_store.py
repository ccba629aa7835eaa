"""The feature store: rows as computed, any number of writers, resumed builds byte-identical (also after kill -9),
refusals naming the field that differs, corruption detected on open."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from attrib_torch.store import FeatureStore, StoreCorrupted, StoreMismatch, build_store, fingerprint_state

N, D, WIDTH = 50, 6, 4


def dataset(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(N, D, generator=g), torch.arange(N))


def model_state():
    return {"w": torch.linspace(-1, 1, D * WIDTH).reshape(D, WIDTH)}


def featurize(batch):
    x, _ = batch
    return torch.tanh(x @ model_state()["w"])


def build(path, **kwargs):
    args = dict(width=WIDTH, description={"method": "test", "seed": 3}, model_state=model_state(), batch_size=4,
                chunk_rows=8, show_progress=False)
    args.update(kwargs)
    return build_store(path, args.pop("featurize", featurize), args.pop("dataset", dataset()), **args)


def files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rows_are_the_features_in_the_dtype_asked_for(tmp_path, dtype):
    store = build(tmp_path / "s", dtype=dtype)
    x = dataset().tensors[0]
    expected = torch.tanh(x @ model_state()["w"]).to(store.torch_dtype)
    assert store.n_rows == N and store.width == WIDTH and store.torch_dtype == expected.dtype
    assert torch.equal(store.rows(), expected)
    assert torch.equal(store.rows(13, 29), expected[13:29])
    reopened = FeatureStore.open(tmp_path / "s")
    assert torch.equal(torch.cat([t for _, t in reopened.features()]), expected)
    assert reopened.manifest["model"] == fingerprint_state(model_state())


def test_two_writers_write_the_rows_one_writes(tmp_path):
    one = build(tmp_path / "one")
    assert build(tmp_path / "two", rank=0, world=2) is None  # rank 1 has not written yet
    two = build(tmp_path / "two", rank=1, world=2)  # the writer that finds every shard done finishes the store
    assert build(tmp_path / "two", rank=0, world=2).manifest == two.manifest  # nothing left to compute
    assert [s.rows for s in two.shards] == [24, 26] and [s.start for s in two.shards] == [0, 24]
    assert torch.equal(two.rows(), one.rows())
    joined = b"".join(np.load(tmp_path / "two" / s.file).tobytes() for s in two.shards)
    assert joined == np.load(tmp_path / "one" / "part-00000.npy").tobytes()


def test_an_interrupted_build_resumes_to_the_same_bytes(tmp_path):
    build(tmp_path / "whole")
    calls = {"n": 0}

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] == 7:  # in the middle of the fourth chunk
            raise KeyboardInterrupt
        return featurize(batch)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed", featurize=crashing)
    ledger = json.loads((tmp_path / "resumed" / "part-00000.ledger.json").read_text())
    assert [c[0] for c in ledger["chunks"]] == [0, 8, 16]
    calls["n"] = 100
    counted = {"n": 0}

    def counting(batch):
        counted["n"] += 1
        return featurize(batch)

    build(tmp_path / "resumed", featurize=counting)
    assert counted["n"] == 7  # only the chunks after the three recorded: rows 24-49, two batches per 8-row chunk
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")


SCRIPT = textwrap.dedent('''
    import sys, time, torch
    from torch.utils.data import TensorDataset
    from attrib_torch.store import build_store
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 6, generator=g))
    w = torch.linspace(-1, 1, 24).reshape(6, 4)
    def featurize(batch):
        time.sleep(float(sys.argv[2]))
        return torch.tanh(batch[0] @ w)
    build_store(sys.argv[1], featurize, data, width=4, description={"m": 1}, model_state={"w": w}, batch_size=4,
                chunk_rows=8, show_progress=False)
''')


def test_a_build_killed_with_sigkill_resumes_to_the_same_bytes(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(script), str(tmp_path / "whole"), "0"], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed"), "0.2"], env=env)
    ledger = tmp_path / "killed" / "part-00000.ledger.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ledger.exists() and len(json.loads(ledger.read_text() or "{}").get("chunks", {})) >= 2:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(ledger.read_text())["chunks"]
    assert 2 <= len(done) < 8  # killed part-way
    subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "0"], check=True, env=env)
    assert files(tmp_path / "killed") == files(tmp_path / "whole")


@pytest.mark.parametrize("change, field", [
    ({"description": {"method": "test", "seed": 4}}, "description"),
    ({"model_state": {"w": torch.zeros(D, WIDTH)}}, "model"),
    ({"dataset": dataset(seed=1)}, "data"),
    ({"dtype": "float16"}, "dtype"),
    ({"chunk_rows": 16}, "chunk_rows"),
    ({"world": 2}, "world"),
])
def test_a_store_of_another_build_refuses_to_be_extended(tmp_path, change, field):
    build(tmp_path / "s")
    with pytest.raises(StoreMismatch, match=f"its {field} is" if field != "world" else "writers"):
        build(tmp_path / "s", **change)


def test_a_damaged_or_truncated_shard_is_refused_on_open(tmp_path):
    build(tmp_path / "s")
    shard = tmp_path / "s" / "part-00000.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupted, match="checksum"):
        FeatureStore.open(tmp_path / "s")
    shard.write_bytes(bytes(data[:-40]))
    with pytest.raises(StoreCorrupted, match="part-00000.npy"):
        FeatureStore.open(tmp_path / "s")
    shard.write_bytes(bytes(data) + b"\0" * 16)
    with pytest.raises(StoreCorrupted, match="bytes beyond its rows"):
        FeatureStore.open(tmp_path / "s", verify=False)
    (tmp_path / "s" / "manifest.json").write_text("{")
    with pytest.raises(StoreCorrupted, match="JSON"):
        FeatureStore.open(tmp_path / "s")


def test_an_unfinished_build_and_bad_arguments_are_named(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", featurize=lambda b: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(StoreCorrupted, match="not finished"):
        FeatureStore.open(tmp_path / "s")
    for kwargs, match in (({"dtype": "int8"}, "dtype"), ({"chunk_rows": 6}, "multiple of batch_size"),
                          ({"rank": 2, "world": 2}, "rank"), ({"width": 0}, "width"),
                          ({"layout": [("a", 1)]}, "layout"), ({"featurize": lambda b: b[0]}, r"\(B, 4\)")):
        with pytest.raises((ValueError, TypeError), match=match):
            build(tmp_path / f"bad-{match[:4]}", **kwargs)


def gpt2_logra():
    """LoGra (rank 3) on a small GPT-2: ``(attributor(seed=0), train_set, train loader, test loader)``."""
    pytest.importorskip("transformers")
    from torch.utils.data import DataLoader

    from attrib_torch import AttributionTask, CausalLMLoss, LoGraAttributor
    from tests.attrib_torch.test_hf_models import Sequences, gpt2

    model = gpt2()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    train_set, test_set = Sequences(9, 41), Sequences(3, 42)

    def attributor(seed=0):
        task = AttributionTask(CausalLMLoss(model), model, state)
        with pytest.warns(UserWarning):  # the LayerNorms left out, named
            return LoGraAttributor(task, rank=3, seed=seed, show_progress=False)

    return attributor, train_set, DataLoader(train_set, batch_size=4), DataLoader(test_set, batch_size=3)


def test_logra_caches_from_a_store_of_its_features_and_refuses_another_ones(tmp_path):
    from torch.utils.data import DataLoader

    from tests.attrib_torch.test_hf_models import Sequences

    attributor, train_set, train, test = gpt2_logra()
    direct = attributor().attribute(train, test)
    store = attributor().build_store(tmp_path / "s", train_set, batch_size=4, chunk_rows=4)
    assert store.n_rows == 9 and store.manifest["description"]["kind"] == "logra"
    stored = attributor()
    calls = {"n": 0}
    real = stored.generate_train_rep

    def counted(ckpt_idx, batch):
        calls["n"] += 1
        return real(ckpt_idx, batch)

    stored.generate_train_rep = counted
    stored.cache(train, stores=[FeatureStore.open(tmp_path / "s")])
    scores = stored.attribute(train, test)
    assert calls["n"] == 0  # the training representations came from the store
    torch.testing.assert_close(scores, direct, rtol=1e-5, atol=1e-7)  # stored in float32, the model is float64
    with pytest.raises(StoreMismatch, match="its description"):
        attributor(seed=1).cache(train, stores=[store])
    with pytest.raises(StoreMismatch, match="its data"):
        attributor().cache(DataLoader(Sequences(9, 43), batch_size=4), stores=[store])
    with pytest.raises(ValueError, match="one per checkpoint"):
        attributor().cache(train, stores=[store, store])


DISTRIBUTED = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch.utils.data import TensorDataset
    from attrib_torch.store import build_store
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(61, 6, generator=g))
    w = torch.linspace(-1, 1, 24).reshape(6, 4)
    store = build_store(sys.argv[1], lambda batch: torch.tanh(batch[0] @ w), data, width=4, description={"m": 1},
                        model_state={"w": w}, batch_size=4, chunk_rows=8, rank=dist.get_rank(),
                        world=dist.get_world_size(), show_progress=False)
    assert store is not None and store.n_rows == 61  # every rank opens the finished store
    dist.barrier()  # no rank tears gloo down while another is still in its last collective
    dist.destroy_process_group()
''')


@pytest.mark.parametrize("ranks", [1, 2])
def test_torchrun_ranks_write_the_bytes_of_one_process(tmp_path, ranks):
    script = tmp_path / "build.py"
    script.write_text(DISTRIBUTED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
                    str(script), str(tmp_path / "ranks")], check=True, env=env, capture_output=True, timeout=300)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(61, 6, generator=g))
    w = torch.linspace(-1, 1, 24).reshape(6, 4)
    one = build_store(tmp_path / "one", lambda batch: torch.tanh(batch[0] @ w), data, width=4, description={"m": 1},
                      model_state={"w": w}, batch_size=4, chunk_rows=8, show_progress=False)
    store = FeatureStore.open(tmp_path / "ranks")
    assert len(store.shards) == ranks
    assert torch.equal(store.rows(), one.rows())
    joined = b"".join(np.load(tmp_path / "ranks" / s.file).tobytes() for s in store.shards)
    assert joined == np.load(tmp_path / "one" / "part-00000.npy").tobytes()


@pytest.mark.parametrize("largest", [True, False])
def test_streamed_topk_over_shards_equals_a_dense_topk(tmp_path, largest):
    build(tmp_path / "s", rank=0, world=3)
    build(tmp_path / "s", rank=1, world=3)
    build(tmp_path / "s", rank=2, world=3)
    store = build(tmp_path / "s", rank=0, world=3)
    queries = torch.randn(5, WIDTH, generator=torch.Generator().manual_seed(7))
    got = store.topk(queries, 6, largest=largest, block_rows=5)  # blocks straddle chunks and shards
    dense = (store.rows() @ queries.T).T
    expected = torch.topk(dense, 6, dim=1, largest=largest)
    assert torch.equal(got.indices, expected.indices)
    torch.testing.assert_close(got.values, expected.values)
    for bad, match in (({"queries": torch.zeros(2, WIDTH + 1)}, "queries"), ({"k": N + 1}, "k"),
                       ({"block_rows": 0}, "block_rows")):
        args = {"queries": queries, "k": 3, **bad}
        with pytest.raises(ValueError, match=match):
            store.topk(args.pop("queries"), args.pop("k"), **args)


@pytest.mark.parametrize("normalized", [False, True])
def test_tracin_with_a_projection_caches_from_a_store_of_projected_gradients(tmp_path, normalized):
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader

    from attrib_torch import AttributionTask, TracInAttributor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(2)
    train_set = TensorDataset(torch.randn(30, D, generator=g), torch.randint(0, 3, (30,), generator=g))
    test_set = TensorDataset(torch.randn(4, D, generator=g), torch.randint(0, 3, (4,), generator=g))

    def loss(params, batch):
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    def attributor():
        return TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], normalized,
                                projector_kwargs={"proj_dim": 5, "proj_seed": 1}, show_progress=False)

    train, test = DataLoader(train_set, batch_size=8), DataLoader(test_set, batch_size=4)
    direct = attributor().attribute(train, test)
    store = attributor().build_store(tmp_path / "s", train_set, batch_size=8, chunk_rows=16)
    assert store.width == 5 and store.manifest["description"]["projection"]["dim"] == 5
    stored = attributor()
    stored.cache(train, stores=[store])
    torch.testing.assert_close(stored.attribute(train, test), direct)
    got = stored.topk(test, 3, proponents=False)  # streamed over the store's rows, normalised as they are read
    assert torch.equal(got.indices, direct.T.topk(3, dim=1, largest=False).indices)
    unnormalized = TracInAttributor(AttributionTask(loss, model, model.state_dict()), [1.0], False,
                                    projector_kwargs={"proj_dim": 5, "proj_seed": 2}, show_progress=False)
    with pytest.raises(StoreMismatch, match="its description"):
        unnormalized.cache(train, stores=[store])


class Tokens(torch.utils.data.Dataset):
    """Sequences of 5 positions, a prefix of each kept (the mask)."""

    def __init__(self, n=N, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 5, D, generator=g)
        self.mask = (torch.arange(5) < torch.randint(1, 6, (n,), generator=g)[:, None]).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "attention_mask": self.mask[i]}


def token_featurize(batch):
    from attrib_torch.store import TokenRows

    keep = batch["attention_mask"].bool()
    terms = torch.tanh(batch["x"] @ model_state()["w"])
    return TokenRows(terms[keep], keep.sum(1), keep.nonzero()[:, 1].to(torch.int32))


def test_a_per_token_store_keeps_offsets_positions_and_resumes_to_the_same_bytes(tmp_path):
    data = Tokens()
    whole = build(tmp_path / "whole", featurize=token_featurize, dataset=data, per_token=True)
    keep = data.mask.bool()
    assert whole.per_token and whole.n_examples == N and whole.n_rows == int(keep.sum())
    assert torch.equal(whole.rows(), torch.tanh(data.x @ model_state()["w"])[keep])
    offsets = whole.token_offsets()
    assert torch.equal(offsets[1:] - offsets[:-1], keep.sum(1))
    examples, positions = whole.locate(torch.arange(whole.n_rows))
    assert torch.equal(examples, keep.nonzero()[:, 0]) and torch.equal(positions, keep.nonzero()[:, 1])
    calls = {"n": 0}

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return token_featurize(batch)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed", featurize=crashing, dataset=data, per_token=True)
    with open(tmp_path / "resumed" / "part-00000.npy", "ab") as f:
        f.write(b"\0" * 40)  # rows of the unfinished chunk, on disk but not in the ledger
    calls["n"] = 100
    build(tmp_path / "resumed", featurize=crashing, dataset=data, per_token=True)
    assert files(tmp_path / "resumed") == files(tmp_path / "whole")
    with pytest.raises(StoreMismatch, match="its per_token is"):
        build(tmp_path / "whole", featurize=token_featurize, dataset=data)
    with pytest.raises(TypeError, match="TokenRows"):
        build(tmp_path / "bad", dataset=data, featurize=lambda b: featurize((b["x"][:, 0], None)), per_token=True)
    with pytest.raises(ValueError, match="one row per example"):
        build(tmp_path / "s").token_offsets()


def test_logra_per_token_stores_add_up_to_sequences_and_give_token_scores(tmp_path):
    from torch.utils.data import DataLoader

    attributor, train_set, train, test = gpt2_logra()

    direct = attributor()
    scores, tokens = direct.attribute(train, test), direct.attribute_tokens(train, test)
    store = attributor().build_store(tmp_path / "t", train_set, per_token=True, batch_size=4, chunk_rows=4)
    assert store.n_examples == 9 and store.n_rows == int(train_set.mask.sum())
    assert torch.equal(store.token_offsets(), tokens.offsets) and torch.equal(store.column("positions").long(),
                                                                              tokens.positions)
    stored = attributor()
    stored.cache(train, stores=[store])  # the Fisher preconditioner fits on the rows added up per sequence
    torch.testing.assert_close(stored.attribute(train, test), scores, rtol=1e-5, atol=1e-7)
    from_store = stored.attribute_tokens(train, test)
    torch.testing.assert_close(from_store.scores, tokens.scores, rtol=1e-5, atol=1e-7)
    best = stored.topk_tokens(test, 5)
    expected = torch.topk(tokens.scores.T, 5, dim=1)
    assert torch.equal(best.indices, expected.indices)
    torch.testing.assert_close(best.values, expected.values, rtol=1e-5, atol=1e-7)
    for proponents in (True, False):  # over sequences: the store's rows added up, streamed
        got, dense = stored.topk(test, 4, proponents), torch.topk(scores.T, 4, dim=1, largest=proponents)
        assert torch.equal(got.indices, dense.indices)
    # another loader: its tokens computed, against the Fisher fitted on the store (in float32, hence rtol 1e-4)
    part = DataLoader(torch.utils.data.Subset(train_set, range(3)), batch_size=4)
    torch.testing.assert_close(stored.attribute_tokens(part, test).scores, tokens.scores[: int(tokens.offsets[3])],
                               rtol=1e-4, atol=1e-6)
    examples, positions = store.locate(best.indices)
    assert torch.equal(tokens.offsets[examples] + positions, best.indices)  # every kept position of a prefix
    with pytest.raises(ValueError, match="no per-token representations"):
        from attrib_torch import TracInAttributor

        TracInAttributor(attributor().task, [1.0], False,
                         show_progress=False).build_store(tmp_path / "x", train_set, per_token=True)


def test_a_resume_recomputes_recorded_chunks_whose_bytes_were_damaged(tmp_path):
    whole = files(build(tmp_path / "whole").path)
    calls = {"n": 0}

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] == 9:  # in the fifth chunk: four recorded
            raise KeyboardInterrupt
        return featurize(batch)

    for damage in ("flip", "truncate"):
        path = tmp_path / damage
        calls["n"] = 0
        with pytest.raises(KeyboardInterrupt):
            build(path, featurize=crashing)
        shard = path / "part-00000.npy"
        data = bytearray(shard.read_bytes())
        if damage == "flip":
            data[128 + 8 * WIDTH * 4 + 5] ^= 0x10  # a byte of the second recorded chunk
        else:
            data = data[: 128 + 20 * WIDTH * 4]  # half of the third recorded chunk gone
        shard.write_bytes(bytes(data))
        calls["n"] = 100
        build(path, featurize=crashing)
        assert files(path) == whole, damage


def test_a_store_directory_without_its_manifest_or_ledger_is_built_again_not_mixed(tmp_path):
    other = {"w": torch.zeros(D, WIDTH)}
    calls = {"n": 0}

    def crashing(batch):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return featurize(batch)

    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "s", featurize=crashing, model_state=other)  # two chunks of another model's rows
    (tmp_path / "s" / "manifest.json").unlink()
    assert files(build(tmp_path / "s").path) == files(build(tmp_path / "fresh").path)
    store = FeatureStore.open(tmp_path / "s")
    mapped = next(store.features())[1]
    before = mapped.clone()
    (tmp_path / "s" / "part-00000.ledger.json").unlink()
    rebuilt = build(tmp_path / "s")  # the shard is written again, to a new file
    assert torch.equal(mapped, before)  # a reader's map of the old file is untouched
    assert files(rebuilt.path) == files(tmp_path / "fresh")


def test_features_not_finite_in_the_store_dtype_are_refused(tmp_path):
    with pytest.raises(ValueError, match="overflows float16"):
        build(tmp_path / "a", dtype="float16", featurize=lambda b: 1e5 * featurize(b))
    with pytest.raises(ValueError, match="NaN or Inf"):
        build(tmp_path / "b", featurize=lambda b: featurize(b) / 0 * 0)
    store = build(tmp_path / "c")
    with pytest.raises(ValueError, match="queries"):
        store.topk(torch.full((2, WIDTH), float("nan")), 3)


def test_a_second_writer_of_one_shard_is_refused_while_the_first_writes(tmp_path):
    from attrib_torch.store import _writer_lock

    (tmp_path / "s").mkdir()
    with _writer_lock(tmp_path / "s", 0):
        with pytest.raises(StoreMismatch, match="another process is writing"):
            build(tmp_path / "s")
    build(tmp_path / "s")


def test_numpy_scalars_in_examples_are_fingerprinted():
    from attrib_torch.store import fingerprint_data

    assert fingerprint_data([(np.float32(1.5), np.int64(3))]) != fingerprint_data([(np.float32(1.5), np.int64(4))])


READER = textwrap.dedent('''
    import sys, torch
    from attrib_torch.store import FeatureStore
    queries = torch.linspace(-1, 1, 12).reshape(3, 4)
    for _ in range(40):
        store = FeatureStore.open(sys.argv[1])  # checksums verified on every open
        top = store.topk(queries, 5, block_rows=7)
    torch.save(top.indices, sys.argv[2])
''')


def test_readers_in_several_processes_read_one_store_at_once(tmp_path):
    store = build(tmp_path / "s", rank=0, world=2)
    store = build(tmp_path / "s", rank=1, world=2)
    script = tmp_path / "read.py"
    script.write_text(READER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    readers = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "s"), str(tmp_path / f"top{i}.pt")],
                                env=env) for i in range(3)]
    assert [r.wait(timeout=300) for r in readers] == [0, 0, 0]
    expected = torch.topk(store.rows() @ torch.linspace(-1, 1, 12).reshape(3, 4).T, 5, dim=0).indices.T
    for i in range(3):
        assert torch.equal(torch.load(tmp_path / f"top{i}.pt"), expected)


def test_a_store_is_refused_for_another_models_buffers_or_another_loss(tmp_path):
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader

    from attrib_torch import AttributionTask, TracInAttributor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).eval()
    train_set = TensorDataset(torch.randn(12, D), torch.randint(0, 3, (12,)))

    def cross_entropy(params, batch):
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    def margin(params, batch):
        return nn.functional.multi_margin_loss(functional_call(model, params, (batch[0],)), batch[1])

    def attributor(loss, state):
        return TracInAttributor(AttributionTask(loss, model, state), [1.0], False, show_progress=False)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    store = attributor(cross_entropy, state).build_store(tmp_path / "s", train_set, batch_size=4, chunk_rows=4)
    train = DataLoader(train_set, batch_size=4)
    attributor(cross_entropy, state).cache(train, stores=[store])
    other = {**state, "1.running_var": state["1.running_var"] * 2}  # the same parameters, other statistics
    with pytest.raises(StoreMismatch, match="its model"):
        attributor(cross_entropy, other).cache(train, stores=[store])
    with pytest.raises(StoreMismatch, match="its description"):
        attributor(margin, state).cache(train, stores=[store])


def test_a_ranks_share_of_blocks_covers_the_store_once_with_the_other_ranks(tmp_path):
    from attrib_torch.store import stored_examples, stored_rows

    for rank in range(3):
        build(tmp_path / "s", rank=rank, world=3)
    store = FeatureStore.open(tmp_path / "s")
    for read in (lambda part: [(s, b.clone()) for s, b in store.blocks(7, part=part)],
                 lambda part: list(stored_rows(store, 7, part=part)),
                 lambda part: list(stored_examples(store, 7, part=part))):
        shares = [read((rank, 2)) for rank in range(2)]
        joined = sorted(shares[0] + shares[1], key=lambda item: item[0])
        whole = read((0, 1))
        assert [s for s, _ in joined] == [s for s, _ in whole]
        assert all(torch.equal(a.float(), b.float()) for (_, a), (_, b) in zip(joined, whole))
        assert torch.equal(torch.cat([b.float() for _, b in whole]), store.rows().float())


def test_a_per_token_batch_of_padding_only_and_an_empty_append_are_written(tmp_path):
    from attrib_torch.store import StoreWriter

    data = Tokens()
    data.mask[:4] = 0  # the first batch keeps no position
    store = build(tmp_path / "s", featurize=token_featurize, dataset=data, per_token=True)
    assert store.n_rows == int(data.mask.sum()) and torch.equal(store.token_offsets()[:5], torch.zeros(5).long())
    writer = StoreWriter(tmp_path / "w", width=3, description={"x": 1})
    writer.append(torch.zeros(0, 3))
    writer.append(torch.ones(2, 3))
    assert torch.equal(writer.close({}).rows(), torch.ones(2, 3))


def test_repairing_a_finished_shard_marks_the_store_unfinished_first(tmp_path):
    import attrib_torch.store as store_module

    build(tmp_path / "s")
    shard = tmp_path / "s" / "part-00000.npy"
    data = bytearray(shard.read_bytes())
    data[128 + 3] ^= 0x01  # a byte of the first chunk
    shard.write_bytes(bytes(data))
    seen = []
    real = store_module._Appended.__init__

    def spying(self, file, *args):
        seen.append(json.loads((tmp_path / "s" / "manifest.json").read_text())["complete"])
        real(self, file, *args)

    store_module._Appended.__init__ = spying
    try:
        repaired = build(tmp_path / "s")
    finally:
        store_module._Appended.__init__ = real
    assert seen and not any(seen)  # unfinished before the shard was touched
    assert files(repaired.path) == files(build(tmp_path / "fresh").path)

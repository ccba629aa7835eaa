"""torch.distributed with 2 gloo ranks in a subprocess: merged accumulator states and gathered top-k equal one
process's; merge_topks breaks ties as a single stream does."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from attrib_torch.distributed import merge_topks
from kernels import TopK, topk_inner

SCRIPT = textwrap.dedent('''
    import sys, torch, torch.distributed as dist
    from torch import nn
    from torch.func import functional_call
    from attrib_core import accumulate, kfac_accumulator
    from attrib_torch.distributed import all_merge, my_part, world
    from attrib_torch.store import FeatureStore

    dist.init_process_group("gloo")
    rank, size = world()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    def loss(p, batch):
        x, y = batch
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
               for _ in range(5)]
    acc = kfac_accumulator(model, loss, params)
    state = acc.init()
    for batch in my_part(batches):  # this rank's batches: 0, 2, 4 or 1, 3
        state = acc.update(state, batch)
    merged = acc.finalize(all_merge(acc, state))
    alone = accumulate(acc, batches)
    for a, b in zip(merged.layers, alone.layers):
        torch.testing.assert_close(a.A, b.A)
        torch.testing.assert_close(a.S, b.S)
        assert a.examples == b.examples == 30
    store = FeatureStore.open(sys.argv[1])
    queries = torch.randn(4, store.width, generator=g)
    for largest in (True, False):
        mine = store.topk(queries, 5, largest=largest, distributed=True)
        one = store.topk(queries, 5, largest=largest)
        assert torch.equal(mine.indices, one.indices) and torch.equal(mine.values, one.values)
    try:  # each rank its own queries: no one answer to merge
        store.topk(queries + rank, 5, distributed=True)
        raise AssertionError("queries differing across ranks were merged")
    except ValueError as error:
        assert "ranks [1]" in str(error), error
    print(f"rank {rank} of {size} ok", flush=True)
    dist.barrier()  # no rank tears gloo down while another is still in its last collective
    dist.destroy_process_group()
''')


def test_two_ranks_merge_statistics_and_top_k_as_one_process(tmp_path):
    from torch.utils.data import TensorDataset

    from attrib_torch.store import build_store

    g = torch.Generator().manual_seed(3)
    data = TensorDataset(torch.randn(37, 4, generator=g))
    for rank in (0, 1, 2):  # three shards, so the two ranks scan unequal parts
        build_store(tmp_path / "s", lambda batch: batch[0] * 2, data, width=4, description={"x": 2}, model_state={},
                    batch_size=4, chunk_rows=8, rank=rank, world=3, show_progress=False)
    assert build_store(tmp_path / "s", lambda batch: batch[0] * 2, data, width=4, description={"x": 2},
                       model_state={}, batch_size=4, chunk_rows=8, rank=0, world=3, show_progress=False) is not None
    out = two_ranks(SCRIPT, tmp_path)
    assert "rank 0 of 2 ok" in out and "rank 1 of 2 ok" in out


def two_ranks(source, tmp_path):
    """The stdout of ``source`` run by 2 gloo ranks under torchrun, given ``tmp_path / "s"``; it must succeed."""
    script = tmp_path / "ranks.py"
    script.write_text(source)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), str(tmp_path / "s")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_merged_top_k_equals_one_stream_ties_included():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-3, 4, (40, 3), generator=g).float()  # many equal scores
    b = torch.randint(-2, 3, (6, 3), generator=g).float()
    for largest in (True, False):
        whole = topk_inner(a, b, 7, largest=largest)
        parts = [topk_inner(a[s:e], b, min(7, e - s), largest=largest) for s, e in ((0, 13), (13, 29), (29, 40))]
        parts = [TopK(p.values, p.indices + s) for p, s in zip(parts, (0, 13, 29))]
        merged = merge_topks(parts[::-1], 7, largest=largest)  # in any order
        assert torch.equal(merged.indices, whole.indices) and torch.equal(merged.values, whole.values)


ATTRIBUTORS = textwrap.dedent('''
    import sys, warnings, torch, torch.distributed as dist
    from torch import nn
    from torch.func import functional_call
    from torch.utils.data import DataLoader, TensorDataset
    from attrib_torch import AttributionTask, IFAttributorEKFAC, LoGraAttributor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    g = torch.Generator().manual_seed(1)
    train_set = TensorDataset(torch.randn(41, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (41,), generator=g))
    test_set = TensorDataset(torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g))
    train, test = DataLoader(train_set, batch_size=4), DataLoader(test_set, batch_size=3)
    def loss(params, batch):
        return nn.functional.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])
    def task():
        return AttributionTask(loss, model, model.state_dict())

    # EK-FAC: each rank fits on every other batch, the statistics merged
    alone, shared = IFAttributorEKFAC(task(), damping=1e-3, show_progress=False), IFAttributorEKFAC(
        task(), damping=1e-3, show_progress=False)
    alone.cache(train)
    shared.cache(train, distributed=True)
    for a, b in zip(alone._fits[0].layers, shared._fits[0].layers):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues)
    torch.testing.assert_close(shared.attribute(train, test), alone.attribute(train, test))

    # LoGra over a store: the Fisher's sums and the top-k shared out, in groups and blocks of 8 rows (so that each
    # rank has several, not one holding everything)
    import attrib_torch.base
    attrib_torch.base._GROUP_MAX_ROWS = attrib_torch.base._STORE_BLOCK_ROWS = 8
    def logra():
        return LoGraAttributor(task(), rank=2, show_progress=False)
    store = logra().build_store(sys.argv[1], train_set, batch_size=4, chunk_rows=8, rank=rank, world=2)
    alone, shared = logra(), logra()
    alone.cache(train, stores=[store])
    shared.cache(train, stores=[store], distributed=True)
    for (va, ea), (vb, eb) in zip(alone._inverses[0], shared._inverses[0]):
        torch.testing.assert_close(ea, eb)
    for proponents in (True, False):
        one, many = alone.topk(test, 5, proponents), shared.topk(test, 5, proponents)
        assert torch.equal(one.indices, many.indices), (one.indices, many.indices)
        torch.testing.assert_close(one.values, many.values)
    print(f"rank {rank} ok", flush=True)
    dist.barrier()  # no rank tears gloo down while another is still in its last collective
    dist.destroy_process_group()
''')


def test_two_ranks_fit_curvature_and_score_through_attributors_as_one_process(tmp_path):
    out = two_ranks(ATTRIBUTORS, tmp_path)
    assert "rank 0 ok" in out and "rank 1 ok" in out

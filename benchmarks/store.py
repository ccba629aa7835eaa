"""The feature store: build throughput with 1 and 2 ranks, query latency and memory against store size, resume cost.

    PYTHONPATH=. python -m benchmarks.store [--parts build,query,resume,faiss] [--sizes 10000,100000,1000000]

- build: ``attrib build`` (LoGra, 16 x 16 per layer, float16) of the digits MLP
  (64-1024-1024-10 over 8,192 noisy digits, as ``benchmarks.scale``) and of the
  language-model benchmark's GPT-2 (its 512 training paragraphs, 4 times over), each
  as one process with 2 threads, one process with 1 thread, and ``torchrun`` with 2
  ranks of 1 thread, side by side; wall time of the whole command, rows/s, MB/s of
  shard written, and the bytes of the 2-rank store against the 1-rank one.
- query: exact top-10 of 16 queries over synthetic float16 stores of 256-wide rows
  (``FeatureStore.topk``, streamed), each size in a fresh process for its peak
  memory, beside a dense ``torch.topk`` over the materialised score matrix; the median
  of 5 calls after a first one.
- resume: the digits build killed (SIGKILL) once half its chunks are recorded, then
  rerun, against an uninterrupted build; the resumed store's bytes are compared.
- faiss (not in the default parts; needs ``faiss-cpu``): synthetic stores of
  ``--faiss-rows`` (default 10⁷) rows of 64 float16 numbers, from a mixture of 1,000
  Gaussian clusters and from one Gaussian (no structure for the lists to find), 100
  queries from the same distribution; FAISS inverted-file indexes
  (``ApproximateIndex``, ``--nlist`` lists, 8-bit and float32 rows): build time, search
  time and recall@10 against the exact streamed top-k, for nprobe 1 to 64.

Every build runs in ``$ATTRIB_CACHE/store-bench`` (default under ``~/.cache/attrib``), never in the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

ROOT = Path(os.environ.get("ATTRIB_CACHE") or Path.home() / ".cache" / "attrib") / "store-bench"
QUERIES, K, WIDTH = 16, 10, 256


# -- objects the command line imports (module:attribute) ----------------------------------------

def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.Tanh(), nn.Linear(1024, 1024), nn.Tanh(), nn.Linear(1024, 10))


def mlp_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def digits() -> Dataset:
    from .scale import tiled_digits

    x, y = tiled_digits(8192, seed=1)
    return TensorDataset(x, y)


def gpt2() -> nn.Module:
    from .lm_data import gpt2 as build

    return build()


class _Tiled(Dataset):
    def __init__(self, base: Dataset, times: int) -> None:
        self.base, self.times = base, times

    def __len__(self) -> int:
        return len(self.base) * self.times

    def __getitem__(self, i: int):
        return self.base[i % len(self.base)]


def paragraphs() -> Dataset:
    from .lm import Sequences
    from .lm_data import load_corpus

    corpus = load_corpus()
    return _Tiled(Sequences(corpus.train_ids, corpus.train_mask), 4)


# -- build ----------------------------------------------------------------------------------------

def _env(threads: int) -> dict:
    path = os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _build_command(store: Path, model: str, data: str, loss: str | None, ranks: int) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m"]
                if ranks > 1 else [sys.executable, "-m"])
    command = launcher + ["attrib_torch", "build", str(store), "--model", model, "--data", data, "--method", "logra",
                          "--proj-dim", "256", "--dtype", "float16", "--batch-size", "32", "--chunk-rows", "256"]
    return command + (["--loss", loss] if loss else [])


def _run(command: list[str], threads: int) -> tuple[float, float]:
    """Wall seconds of the whole command, and of the slowest rank's featurising (the CLI's "featurised" lines)."""
    start = time.perf_counter()
    out = subprocess.run(command, env=_env(threads), capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "build failed")
    seconds = time.perf_counter() - start
    ranks = [float(m) for m in re.findall(r"featurised \d+ examples in ([0-9.]+) s", out.stdout)]
    return seconds, max(ranks) if ranks else float("nan")


def _shard_bytes(store: Path) -> bytes:
    import numpy as np

    manifest = json.loads((store / "manifest.json").read_text())
    return b"".join(np.load(store / s["file"]).tobytes() for s in manifest["shards"])


def build_part() -> None:
    startup, _ = _run([sys.executable, "-m", "attrib_torch", "--help"], 1)
    print(f"python -m attrib_torch --help (imports only): {startup:.1f} s\n")
    print("| model | rows | writers x threads | seconds (whole command) | featurising (s, slowest rank) | "
          "rows/s featurising | MB/s written | same rows as 1 x 2 |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for label, model, data, loss in (("digits MLP 1.1M", "benchmarks.store:mlp", "benchmarks.store:digits",
                                      "benchmarks.store:mlp_loss"),
                                     ("GPT-2 170k, 64 tokens", "benchmarks.store:gpt2", "benchmarks.store:paragraphs",
                                      None)):
        reference = None
        for ranks, threads in ((1, 2), (1, 1), (2, 1)):
            store = ROOT / f"build-{label.split()[0]}-{ranks}x{threads}"
            shutil.rmtree(store, ignore_errors=True)
            seconds, featurising = _run(_build_command(store, model, data, loss, ranks), threads)
            manifest = json.loads((store / "manifest.json").read_text())
            written = sum((store / s["file"]).stat().st_size for s in manifest["shards"])
            rows = manifest["rows"]
            same = ""
            if reference is None:
                reference = _shard_bytes(store)
            else:
                same = "bytes equal" if _shard_bytes(store) == reference else "DIFFERENT"
            print(f"| {label} | {rows:,} | {ranks} x {threads} | {seconds:.1f} | {featurising:.2f} | "
                  f"{rows / featurising:,.0f} | {written / featurising / 1e6:.2f} | {same} |", flush=True)


# -- query ----------------------------------------------------------------------------------------

def _synthetic(rows: int, path: Path):
    """A float16 store of ``rows`` seeded Gaussian rows (chunk by chunk, never all in memory)."""
    from attrib_torch.store import FeatureStore, build_store

    if (path / "manifest.json").exists():
        try:
            return FeatureStore.open(path, verify=False)
        except ValueError:
            shutil.rmtree(path)

    class Seeds(Dataset):
        def __len__(self) -> int:
            return rows

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.tensor(i)

    def rows_of(batch) -> torch.Tensor:
        (index,) = batch
        g = torch.Generator().manual_seed(int(index[0]))
        return torch.randn(len(index), WIDTH, generator=g)

    return build_store(path, rows_of, Seeds(), width=WIDTH, description={"synthetic": True}, model_state={},
                       dtype="float16", batch_size=8192, chunk_rows=65536, show_progress=False)


def query_one(rows: int, mode: str) -> dict:
    from attrib_torch.store import FeatureStore

    _synthetic(rows, ROOT / f"synthetic-{rows}")
    store = FeatureStore.open(ROOT / f"synthetic-{rows}", verify=False)
    queries = torch.randn(QUERIES, WIDTH, generator=torch.Generator().manual_seed(0))

    def run():
        if mode == "stream":
            return store.topk(queries, K)
        return torch.topk((store.rows().float() @ queries.T).T, K, dim=1)

    from .measure import timed

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run()  # first call: page cache, first-use costs
    first = time.perf_counter() - start
    seconds, result = timed(run, repeats=5, warmup=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "first_seconds": first, "peak_mib": peak / 1024, "base_mib": before / 1024,
            "first": result.indices[0, :3].tolist()}


def query_part(sizes: list[int]) -> None:
    from .measure import in_fresh_process

    for rows in sizes:  # built once, outside the timed processes
        _synthetic(rows, ROOT / f"synthetic-{rows}")
    print(f"\n{QUERIES} queries, top-{K}, rows of {WIDTH} float16 numbers; each way in a fresh process, the median "
          "of 5 calls after the first (first call in brackets); peak RSS above the process's RSS before the calls\n")
    print("| rows | store MB | streamed top-k (s) | its peak RSS growth (MiB) | dense torch.topk (s) | "
          "its peak RSS growth (MiB) | same top-3 of query 0 |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for rows in sizes:
        size = sum(p.stat().st_size for p in (ROOT / f"synthetic-{rows}").glob("*.npy")) / 1e6
        s = in_fresh_process("benchmarks.store", "query", rows, "stream")
        d = in_fresh_process("benchmarks.store", "query", rows, "dense")
        grow = {name: r["peak_mib"] - r["base_mib"] for name, r in (("s", s), ("d", d))}
        print(f"| {rows:,} | {size:.0f} | {s['seconds']:.3f} ({s['first_seconds']:.3f}) | {grow['s']:.0f} | "
              f"{d['seconds']:.3f} ({d['first_seconds']:.3f}) | {grow['d']:.0f} | {s['first'] == d['first']} |",
              flush=True)


# -- resume ---------------------------------------------------------------------------------------

def resume_part() -> None:
    args = ("benchmarks.store:mlp", "benchmarks.store:digits", "benchmarks.store:mlp_loss")
    whole = ROOT / "resume-whole"
    shutil.rmtree(whole, ignore_errors=True)
    uninterrupted, _ = _run(_build_command(whole, *args, ranks=1), 2)
    killed = ROOT / "resume-killed"
    shutil.rmtree(killed, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.Popen(_build_command(killed, *args, ranks=1), env=_env(2), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ledger = killed / "part-00000.ledger.json"
    total = 8192 // 256
    while proc.poll() is None:
        if ledger.exists() and len(json.loads(ledger.read_text()).get("chunks", {})) >= total // 2:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = time.perf_counter() - start
    done = len(json.loads(ledger.read_text())["chunks"])
    second, _ = _run([sys.executable, "-m", "attrib_torch", "build", str(killed), "--resume"], 2)
    same = all((killed / name).read_bytes() == (whole / name).read_bytes()
               for name in ("manifest.json", "part-00000.npy"))
    print(f"\ndigits MLP, 8,192 rows in {total} chunks: uninterrupted {uninterrupted:.1f} s; killed after "
          f"{done} chunks at {first:.1f} s, resumed in {second:.1f} s: {first + second:.1f} s in all "
          f"({(first + second) / uninterrupted:.2f}x); resumed store byte-identical: {same}")


# -- approximate search ---------------------------------------------------------------------------

FAISS_WIDTH, FAISS_QUERIES, FAISS_CLUSTERS, NOISE = 64, 100, 1000, 0.7


def _synthetic_rows(rows: int, path: Path, clustered: bool):
    """A float16 store of ``rows`` rows of 64 numbers, written a block at a time, and 100 queries from the same
    distribution: a mixture of 1,000 Gaussian clusters (centres of norm about 8, noise 0.7 a coordinate), or
    (``clustered=False``) one standard Gaussian, the case an inverted file does worst on."""
    from attrib_torch.store import FeatureStore, StoreWriter

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(FAISS_CLUSTERS, FAISS_WIDTH, generator=g) * (1.0 if clustered else 0.0)
    noise = NOISE if clustered else 1.0
    queries = centres[torch.randint(0, FAISS_CLUSTERS, (FAISS_QUERIES,), generator=g)] + \
        torch.randn(FAISS_QUERIES, FAISS_WIDTH, generator=g) * noise
    if (path / "manifest.json").exists():
        try:
            return FeatureStore.open(path, verify=False), queries
        except ValueError:
            pass
    shutil.rmtree(path, ignore_errors=True)
    writer = StoreWriter(path, width=FAISS_WIDTH, description={"synthetic": "clusters" if clustered else "gaussian",
                                                               "rows": rows, "noise": noise},
                         dtype="float16")
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        block = torch.Generator().manual_seed(start + 1)
        which = torch.randint(0, FAISS_CLUSTERS, (n,), generator=block)
        writer.append(centres[which] + torch.randn(n, FAISS_WIDTH, generator=block) * noise)
    return writer.close({}), queries


def faiss_part(rows: int, nlist: int) -> None:
    for clustered in (True, False):
        _faiss_one(rows, nlist, clustered)


def _faiss_one(rows: int, nlist: int, clustered: bool) -> None:
    from attrib_torch.approximate import ApproximateIndex, recall_at_k

    name = "clustered" if clustered else "gaussian"
    store, queries = _synthetic_rows(rows, ROOT / f"{name}-{rows}", clustered)
    start = time.perf_counter()
    exact = store.topk(queries, K)
    exact_seconds = time.perf_counter() - start
    print(f"\n{name}: {rows:,} rows of {FAISS_WIDTH} float16 numbers ({store.n_rows * FAISS_WIDTH * 2 / 1e9:.2f} GB), "
          f"{FAISS_QUERIES} queries, top-{K}; exact streamed FeatureStore.topk: {exact_seconds:.1f} s\n")
    print("| index | nlist | build (s) | nprobe | search (s) | speed-up over exact | recall@10 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in ("ivf-sq8", "ivf-flat"):
        start = time.perf_counter()
        index = ApproximateIndex.build(store, kind=kind, nlist=nlist, save=False, show_progress=False)
        built = time.perf_counter() - start
        for nprobe in (1, 4, 16, 64):
            start = time.perf_counter()
            found = index.search(queries, K, nprobe=nprobe)
            seconds = time.perf_counter() - start
            print(f"| {kind} | {nlist} | {built:.0f} | {nprobe} | {seconds:.3f} | {exact_seconds / seconds:.0f}x | "
                  f"{recall_at_k(found.indices, exact.indices):.3f} |", flush=True)
        del index


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="build,query,resume")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--faiss-rows", dest="faiss_rows", type=int, default=10_000_000)
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--single", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        _, rows, mode = args.single
        print(json.dumps(query_one(int(rows), mode)))
        return
    ROOT.mkdir(parents=True, exist_ok=True)
    parts = args.parts.split(",")
    if "build" in parts:
        build_part()
    if "query" in parts:
        query_part([int(v) for v in args.sizes.split(",")])
    if "resume" in parts:
        resume_part()
    if "faiss" in parts:
        faiss_part(args.faiss_rows, args.nlist)


if __name__ == "__main__":
    main()

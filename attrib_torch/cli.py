"""The command line: ``attrib build | query | info`` (also ``python -m attrib_torch``).

User objects are named by import strings ``module:attribute``, each a zero-argument
callable (``--model pkg.models:gpt2`` calls ``pkg.models.gpt2()``), so any code works
without a configuration language::

    attrib build STORE --model M --data D [--method logra|factgrass|grad] [--proj-dim K] [--dtype float16]
                 [--batch-size B] [--loss L] [--seed S] [--chunk-rows C] [--per-token] [--device D]
    attrib build STORE --resume                    # rerun the saved configuration (after a crash)
    attrib query STORE --queries Q --k 10 [--opponents] [--tokens] [--approximate --nprobe P] --out FILE.pt|.npz
    attrib index STORE [--kind ivf-sq8|ivf-flat] [--nlist N]   # a FAISS index for --approximate
    attrib info STORE

``M()`` returns an ``nn.Module`` (put in eval mode here), ``D()`` and ``Q()`` a map-style
dataset or a DataLoader over one (its batch size is the default). The loss is the
model's own: :class:`attrib_torch.CausalLMLoss` for a causal language model given dict
batches (Hugging Face's ``.loss`` of each sequence alone), else the ``.loss`` of
``model(**batch)``; ``--loss L`` names ``L(model, batch) -> loss`` instead. Under
``torchrun --nproc_per_node N -m attrib_torch build ...`` each rank writes its own shard
(on GPU ``N`` processes take ``cuda:LOCAL_RANK`` each, through NCCL). The configuration
is saved as ``build.json`` beside the manifest; every argument is checked before the
model or the data is loaded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["main", "load_object"]

CONFIG = "build.json"
METHODS = ("logra", "factgrass", "grad")
_BUILD_FIELDS = ("model", "data", "method", "proj_dim", "dtype", "batch_size", "loss", "seed", "chunk_rows",
                 "per_token", "device")
_DEFAULT_CHUNK_ROWS = 1024


def load_object(spec: str, what: str) -> Any:
    """``module:attribute`` imported and called with no arguments (SystemExit with the reason if it fails)."""
    target = import_object(spec, what)
    if not callable(target):
        raise SystemExit(f"--{what}: {spec} is not callable")
    return target()


def import_object(spec: str, what: str) -> Any:
    """The attribute ``module:attribute`` names (dotted attributes allowed), or SystemExit with the reason."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise SystemExit(f"--{what}: expected an import string module:attribute, got {spec!r}")
    module_name, attribute = spec.split(":")
    sys.path.insert(0, os.getcwd())  # user modules next to where the command runs, as uvicorn does
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"--{what}: cannot import {module_name!r} ({error})") from error
    finally:
        sys.path.pop(0)
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise SystemExit(f"--{what}: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


class _LossOf(nn.Module):
    """``L(model, batch)`` as a module, so ``functional_call`` can run it at any parameters."""

    def __init__(self, model: nn.Module, loss: Callable) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch: Any) -> Tensor:
        return self.loss(self.model, batch)


def _loss_func(model: nn.Module, loss_spec: Optional[str], example: Any) -> Callable:
    """The task's ``loss_func(params, batch)``: ``--loss``, a causal LM's per-sequence loss, or the model's ``.loss``."""
    from .lm import CausalLMLoss

    if loss_spec:
        user = import_object(loss_spec, "loss")
        if not callable(user):
            raise SystemExit(f"--loss: {loss_spec} is not callable")
        wrapper = _LossOf(model, user)
        return lambda params, batch: functional_call(wrapper, {f"model.{k}": v for k, v in params.items()}, (batch,))
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel"))
                 for name in (getattr(getattr(model, "config", None), "architectures", None) or [type(model).__name__]))
    if isinstance(example, dict) and "input_ids" in example and causal:
        return CausalLMLoss(model)

    def own_loss(params, batch):
        output = functional_call(model, params, (), dict(batch)) if isinstance(batch, dict) else \
            functional_call(model, params, tuple(batch))
        loss = getattr(output, "loss", None)
        if loss is None:
            raise SystemExit("--loss: the model's output has no .loss; name a loss function with --loss")
        return loss

    return own_loss


def _dataset_and_batch(obj: Any, what: str) -> tuple[Any, Optional[int]]:
    from torch.utils.data import DataLoader

    if isinstance(obj, DataLoader):
        return obj.dataset, obj.batch_size
    if hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        return obj, None
    raise SystemExit(f"--{what}: expected a map-style dataset or a DataLoader over one, got {type(obj).__name__}")


def _attributor(config: dict, model: nn.Module, dataset: Any, device: str):
    """The attributor whose training representations the store holds, from the saved configuration."""
    from .logra import LoGraAttributor
    from .task import AttributionTask
    from .tracin import TracInAttributor

    model.eval().to(device)
    example = dataset[0]
    task = AttributionTask(_loss_func(model, config.get("loss"), example), model,
                           {k: v.detach().clone() for k, v in model.state_dict().items()})
    if config["method"] in ("logra", "factgrass"):
        return LoGraAttributor(task, rank=math.isqrt(config["proj_dim"]), kind=config["method"], seed=config["seed"],
                               device=device)
    return TracInAttributor(task, [1.0], False, projector_kwargs={"proj_dim": config["proj_dim"],
                                                                   "proj_seed": config["seed"]}, device=device)


def _check_config(config: dict) -> None:
    """Every build option valid, before anything is loaded (SystemExit naming the option)."""
    if config["method"] not in METHODS:
        raise SystemExit(f"--method: expected one of {METHODS}, got {config['method']!r}")
    for field in ("proj_dim", "batch_size", "chunk_rows"):
        value = config.get(field)
        if value is not None and value < 1:
            raise SystemExit(f"--{field.replace('_', '-')}: expected a positive integer, got {value}")
    if config["method"] in ("logra", "factgrass") and math.isqrt(config["proj_dim"]) ** 2 != config["proj_dim"]:
        raise SystemExit(f"--proj-dim: {config['method']} compresses each layer to k_out * k_in = k² numbers; "
                         f"expected a perfect square (256 for k = 16), got {config['proj_dim']}")
    if config["per_token"] and config["method"] == "grad":
        raise SystemExit("--per-token: needs --method logra or factgrass (projected whole gradients do not split "
                         "over positions)")
    if config["device"] not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu or cuda, got {config['device']!r}")
    if config["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device: cuda asked for, and torch sees no CUDA device")
    given_chunk = config["given"].get("chunk_rows")
    if given_chunk is not None and config["batch_size"] is not None and given_chunk % config["batch_size"]:
        raise SystemExit(f"--chunk-rows: expected a multiple of --batch-size {config['batch_size']}, got {given_chunk}")


def _process(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process: under torchrun, its rank of the process group (NCCL and
    ``cuda:LOCAL_RANK`` on GPU, gloo on CPU)."""
    from .distributed import world

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    rank, size = world()
    return rank, size, device


def _build_config(args: argparse.Namespace, saved: Path) -> dict:
    """The build's configuration: the saved one for ``--resume`` or a rerun of the same command (the options
    given then, ``"given"``, and what they resolved to), else the options given with the defaults."""
    given = {f: getattr(args, f) for f in _BUILD_FIELDS if getattr(args, f) is not None and getattr(args, f) is not False}
    previous = json.loads(saved.read_text()) if saved.exists() else None
    if args.resume:
        if previous is None:
            raise SystemExit(f"--resume: {saved.parent} has no {CONFIG}; start the build with --model and --data")
        differ = {f: v for f, v in given.items() if v not in (previous["given"].get(f), previous.get(f))}
        if differ:
            raise SystemExit(f"--resume: {', '.join(f'--{f} {v!r} (saved: {previous.get(f)!r})' for f, v in differ.items())}"
                             "; resume with the saved configuration or build a new store")
        return previous
    if args.model is None or args.data is None:
        raise SystemExit("build: --model and --data are required (or --resume to rerun a saved build)")
    method = given.get("method", "logra")
    defaults = {"method": method, "proj_dim": 256 if method in ("logra", "factgrass") else 4096,
                "dtype": "float32", "seed": 0, "chunk_rows": None, "batch_size": None, "loss": None,
                "per_token": False, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    config = {**defaults, **given, "given": given}
    if previous is not None:
        # the same build again (an option spelled out at its default included): it finishes the store; the batch
        # size and chunking are resolved from the data when not given, so they are compared only when given
        differ = [f for f in _BUILD_FIELDS if (f in given or f not in ("batch_size", "chunk_rows"))
                  and config[f] != previous.get(f)]
        if differ:
            raise SystemExit(f"build: {saved.parent} was built with another configuration ({saved}: "
                             f"{', '.join(f'{f}={previous.get(f)!r}' for f in differ)}; this command: "
                             f"{', '.join(f'{f}={config[f]!r}' for f in differ)}); use --resume, or another directory")
        return previous
    return config


def build(args: argparse.Namespace) -> None:
    store = Path(args.store)
    saved = store / CONFIG
    config = _build_config(args, saved)
    _check_config(config)
    rank, world, device = _process(config["device"])
    model = load_object(config["model"], "model")
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--model: {config['model']}() returned a {type(model).__name__}, not an nn.Module")
    dataset, loader_batch = _dataset_and_batch(load_object(config["data"], "data"), "data")
    if config["batch_size"] is None:
        config["batch_size"] = loader_batch or 32
    if config["chunk_rows"] is None:  # the default: about 1024 rows, whole batches
        config["chunk_rows"] = max(config["batch_size"], _DEFAULT_CHUNK_ROWS // config["batch_size"] * config["batch_size"])
    _check_config(config)
    attributor = _attributor(config, model, dataset, device)
    if rank == 0:
        store.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(config, indent=1, sort_keys=True))
    timings: dict = {}
    result = attributor.build_store(store, dataset, dtype=config["dtype"], per_token=config["per_token"],
                                    batch_size=config["batch_size"], chunk_rows=config["chunk_rows"], rank=rank,
                                    world=world, timings=timings)
    print(f"rank {rank} of {world}: fingerprints {timings['fingerprints']:.2f} s, featurised "
          f"{timings['rows_written']} examples in {timings['rows']:.2f} s", flush=True)
    if rank == 0 and result is not None:
        what = f"{result.n_rows} token rows of {result.n_examples} examples" if result.per_token else \
            f"{result.n_rows} rows"
        print(f"{store}: {what} x {result.width} ({config['dtype']}), {len(result.shards)} shard(s)")


def query(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    from .store import FeatureStore

    out = Path(args.out)
    if out.suffix not in (".pt", ".npz"):
        raise SystemExit(f"--out: expected a .pt or .npz file, got {out}")
    if args.k < 1:
        raise SystemExit(f"--k: expected a positive integer, got {args.k}")
    saved = Path(args.store) / CONFIG
    if not saved.exists():
        raise SystemExit(f"query: {args.store} has no {CONFIG} (build it with `attrib build`)")
    config = json.loads(saved.read_text())
    store = FeatureStore.open(args.store)
    if args.tokens and not store.per_token:
        raise SystemExit(f"--tokens: {args.store} holds one row per example (build it with --per-token)")
    if args.approximate and store.per_token and not args.tokens:
        raise SystemExit("--approximate: a per-token store's index holds token rows; add --tokens")
    if args.nprobe < 1:
        raise SystemExit(f"--nprobe: expected a positive integer, got {args.nprobe}")
    approximate = None
    if args.approximate:
        from .approximate import ApproximateIndex

        try:
            approximate = ApproximateIndex.load(store)
        except FileNotFoundError as error:
            raise SystemExit(f"--approximate: {error}; run `attrib index {args.store}` first") from error
    _, _, device = _process(config["device"] if config["device"] != "cuda" or torch.cuda.is_available() else "cpu")
    model = load_object(args.model or config["model"], "model")
    dataset, _ = _dataset_and_batch(load_object(config["data"], "data"), "data")
    queries, batch = _dataset_and_batch(load_object(args.queries, "queries"), "queries")
    attributor = _attributor(config, model, dataset, device)
    attributor.cache(DataLoader(dataset, batch_size=config["batch_size"]), stores=[store])  # checks the store
    test = DataLoader(queries, batch_size=batch or config["batch_size"])
    rows = store.n_rows if args.tokens else store.n_examples
    k = min(args.k, rows)
    if k < args.k:
        print(f"--k {args.k}: the store holds {rows} {'token rows' if args.tokens else 'examples'}; returning all")
    if approximate is not None:  # the store's rows are the scoring representations (the CLI's attributors
        # transform only the queries), so the index of the rows answers for them
        result = approximate.search(attributor.test_representations(test), k, nprobe=args.nprobe,
                              largest=not args.opponents)
    elif args.tokens:
        result = attributor.topk_tokens(test, k, proponents=not args.opponents)
    else:
        result = attributor.topk(test, k, proponents=not args.opponents)
    found = {"indices": result.indices.cpu(), "scores": result.values.cpu()}
    missing = int((found["indices"] < 0).sum())  # an approximate search whose lists held fewer than k rows
    if args.tokens:  # the token rows' sequences and positions (-1 where an approximate search found none)
        valid = found["indices"] >= 0
        found["examples"] = torch.full_like(found["indices"], -1)
        found["positions"] = torch.full_like(found["indices"], -1)
        found["examples"][valid], found["positions"][valid] = store.locate(found["indices"][valid])
    if missing:
        print(f"--approximate: {missing} of {found['indices'].numel()} entries found no row (index -1, score NaN) "
              f"in the {args.nprobe} lists scanned; raise --nprobe")
    if out.suffix == ".npz":
        import numpy as np

        np.savez(out, **{name: value.numpy() for name, value in found.items()})
    else:
        torch.save(found, out)
    print(f"{out}: top {k} {'opponents' if args.opponents else 'proponents'} of {len(found['indices'])} queries"
          + (" (token rows, with their examples and positions)" if args.tokens else "")
          + (f" (approximate: FAISS, nprobe {args.nprobe})" if approximate is not None else ""))


def index(args: argparse.Namespace) -> None:
    from .approximate import INDEX_KINDS, ApproximateIndex
    from .store import FeatureStore

    if args.kind not in INDEX_KINDS:
        raise SystemExit(f"--kind: expected one of {INDEX_KINDS}, got {args.kind!r}")
    if args.nlist is not None and args.nlist < 1:
        raise SystemExit(f"--nlist: expected a positive integer, got {args.nlist}")
    store = FeatureStore.open(args.store)
    try:
        built = ApproximateIndex.build(store, kind=args.kind, nlist=args.nlist)
    except ValueError as error:
        raise SystemExit(f"index: {error}") from error
    print(f"{args.store}/faiss: {built.settings['kind']} index of {store.n_rows} rows in {built.settings['nlist']} "
          "lists")


def info(args: argparse.Namespace) -> None:
    from .store import MANIFEST, FeatureStore, StoreCorrupted, read_manifest

    path = Path(args.store)
    if not path.is_dir():
        raise SystemExit(f"info: {path} is not a directory")
    try:
        store = FeatureStore.open(path, verify=True)
        status = "complete, every file's checksum verified"
        manifest = store.manifest
    except (StoreCorrupted, FileNotFoundError) as error:
        status = f"NOT USABLE: {error}"
        try:
            manifest = read_manifest(path) if (path / MANIFEST).exists() else {}
        except StoreCorrupted:
            manifest = {}
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"store {path}: {status}")
    print(f"rows {manifest.get('rows')}, examples {manifest.get('examples')}, width {manifest.get('width')}, "
          f"dtype {manifest.get('dtype')}, per token {bool(manifest.get('per_token'))}, "
          f"{size / 2**20:.1f} MiB on disk")
    print(json.dumps({k: v for k, v in manifest.items() if k != "shards"}, indent=1, sort_keys=True))
    for shard in manifest.get("shards", []):
        print(f"  {shard['file']}: rows {shard['start']}..{shard['start'] + shard['rows'] - 1}, sha256 "
              f"{shard['sha256'][:16]}...")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="attrib", description="Feature stores of training data: build, query, info.")
    commands = top.add_subparsers(dest="command", required=True)
    b = commands.add_parser("build", help="featurise a training set into a store (resumable)",
                            description="Featurise a training set into a store; rerun with --resume after a crash.")
    b.add_argument("store")
    b.add_argument("--model", help="module:attribute returning the nn.Module")
    b.add_argument("--data", help="module:attribute returning a map-style dataset or a DataLoader")
    b.add_argument("--method", choices=METHODS, help="logra (default), factgrass, or grad (projected gradients)")
    b.add_argument("--proj-dim", dest="proj_dim", type=int,
                   help="numbers per layer for logra/factgrass (k², default 256) or in all for grad (default 4096)")
    b.add_argument("--dtype", choices=("float16", "bfloat16", "float32"))
    b.add_argument("--batch-size", dest="batch_size", type=int)
    b.add_argument("--chunk-rows", dest="chunk_rows", type=int, help="rows written and recorded at a time")
    b.add_argument("--loss", help="module:attribute of L(model, batch) -> loss (default: the model's own)")
    b.add_argument("--seed", type=int, help="of the projection (default 0)")
    b.add_argument("--per-token", dest="per_token", action="store_true",
                   help="one row per kept position (logra/factgrass), with its sequence and position")
    b.add_argument("--device", choices=("cpu", "cuda"), help="where to featurise (default: cuda if available)")
    b.add_argument("--resume", action="store_true", help="continue the build saved in STORE/build.json")
    b.set_defaults(run=build)
    q = commands.add_parser("query", help="exact top-k training rows for queries",
                            description="Exact top-k training rows for each query, streamed over the store.")
    q.add_argument("store")
    q.add_argument("--queries", required=True, help="module:attribute returning the queries' dataset or DataLoader")
    q.add_argument("--model", help="module:attribute (default: the one the store was built with)")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--opponents", action="store_true", help="the k most negative scores instead")
    q.add_argument("--tokens", action="store_true", help="top training positions of a per-token store")
    q.add_argument("--approximate", action="store_true", help="search the store's FAISS index (attrib index)")
    q.add_argument("--nprobe", type=int, default=16, help="lists an approximate search scans (default 16)")
    q.add_argument("--out", required=True, help="FILE.pt or FILE.npz: indices and scores, (n_queries, k)")
    q.set_defaults(run=query)
    x = commands.add_parser("index", help="a FAISS index of a store's rows, for query --approximate",
                            description="Build an approximate (FAISS inverted-file) index of a store's rows.")
    x.add_argument("store")
    x.add_argument("--kind", default="ivf-sq8", help="ivf-sq8 (one byte a number, default) or ivf-flat (float32)")
    x.add_argument("--nlist", type=int, help="lists (k-means centroids); default 4 sqrt(rows)")
    x.set_defaults(run=index)
    i = commands.add_parser("info", help="the manifest, size and integrity of a store")
    i.add_argument("store")
    i.set_defaults(run=info)
    return top


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""The command line: ``attrib build | query | info`` (also ``python -m attrib_torch``).

User objects are named by import strings ``module:attribute``, each a zero-argument
callable (``--model pkg.models:gpt2`` calls ``pkg.models.gpt2()``), so any code works
without a configuration language::

    attrib build STORE --model M --data D [--method logra|factgrass|grad] [--proj-dim K] [--dtype float16]
                 [--batch-size B] [--loss L] [--seed S] [--chunk-rows C]
    attrib build STORE --resume                    # rerun the saved configuration (after a crash)
    attrib query STORE --queries Q --k 10 [--opponents] --out FILE.pt|FILE.npz
    attrib info STORE

``M()`` returns an ``nn.Module`` (put in eval mode here), ``D()`` and ``Q()`` a map-style
dataset or a DataLoader over one (its batch size is the default). The loss is the
model's own: :class:`attrib_torch.CausalLMLoss` for a causal language model given dict
batches (Hugging Face's ``.loss`` of each sequence alone), else the ``.loss`` of
``model(**batch)``; ``--loss L`` names ``L(model, batch) -> loss`` instead. Under
``torchrun --nproc_per_node N -m attrib_torch build ...`` each rank writes its own shard.
The configuration is saved as ``build.json`` beside the manifest.
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
_BUILD_FIELDS = ("model", "data", "method", "proj_dim", "dtype", "batch_size", "loss", "seed", "chunk_rows")


def load_object(spec: str, what: str) -> Any:
    """``module:attribute`` imported and called with no arguments (SystemExit with the reason if it fails)."""
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
    if not callable(target):
        raise SystemExit(f"--{what}: {spec} is not callable")
    return target()


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
        module, attribute = loss_spec.split(":") if loss_spec.count(":") == 1 else (None, None)
        if module is None:
            raise SystemExit(f"--loss: expected an import string module:attribute, got {loss_spec!r}")
        sys.path.insert(0, os.getcwd())
        try:
            user = getattr(importlib.import_module(module), attribute)
        except (ImportError, AttributeError) as error:
            raise SystemExit(f"--loss: cannot load {loss_spec!r} ({error})") from error
        finally:
            sys.path.pop(0)
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


def _attributor(config: dict, model: nn.Module, dataset: Any):
    """The attributor whose training representations the store holds, from the saved configuration."""
    from .logra import LoGraAttributor
    from .task import AttributionTask
    from .tracin import TracInAttributor

    model.eval()
    example = dataset[0]
    task = AttributionTask(_loss_func(model, config.get("loss"), example), model,
                           {k: v.detach().clone() for k, v in model.state_dict().items()})
    if config["method"] in ("logra", "factgrass"):
        rank = math.isqrt(config["proj_dim"])
        if rank * rank != config["proj_dim"]:
            raise SystemExit(f"--proj-dim: {config['method']} compresses each layer to k_out * k_in = k² numbers; "
                             f"expected a perfect square (256 for k = 16), got {config['proj_dim']}")
        return LoGraAttributor(task, rank=rank, kind=config["method"], seed=config["seed"])
    return TracInAttributor(task, [1.0], False, projector_kwargs={"proj_dim": config["proj_dim"],
                                                                   "proj_seed": config["seed"]})


def _distributed() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when torchrun started this process (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build(args: argparse.Namespace) -> None:
    store = Path(args.store)
    saved = store / CONFIG
    if args.resume:
        if not saved.exists():
            raise SystemExit(f"--resume: {store} has no {CONFIG}; start the build with --model and --data")
        config = json.loads(saved.read_text())
        given = {f: getattr(args, f) for f in _BUILD_FIELDS if getattr(args, f) is not None}
        differ = {f: (v, config[f]) for f, v in given.items() if config.get(f) != v}
        if differ:
            raise SystemExit(f"--resume: {', '.join(f'--{f} {a!r} (saved: {b!r})' for f, (a, b) in differ.items())}"
                             "; resume with the saved configuration or build a new store")
    else:
        if args.model is None or args.data is None:
            raise SystemExit("build: --model and --data are required (or --resume to rerun a saved build)")
        config = {f: getattr(args, f) for f in _BUILD_FIELDS}
        defaults = {"method": "logra", "proj_dim": 256 if args.method in (None, "logra", "factgrass") else 4096,
                    "dtype": "float32", "seed": 0, "chunk_rows": 1024}
        config = {f: (defaults.get(f) if v is None else v) for f, v in config.items()}
        if saved.exists() and json.loads(saved.read_text()) != {**json.loads(saved.read_text()), **config}:
            raise SystemExit(f"build: {store} was built with another configuration ({saved}); use --resume, or "
                             "another directory")
    if config["method"] not in METHODS:
        raise SystemExit(f"--method: expected one of {METHODS}, got {config['method']!r}")
    rank, world = _distributed()
    model = load_object(config["model"], "model")
    if not isinstance(model, nn.Module):
        raise SystemExit(f"--model: {config['model']}() returned a {type(model).__name__}, not an nn.Module")
    dataset, loader_batch = _dataset_and_batch(load_object(config["data"], "data"), "data")
    config["batch_size"] = config["batch_size"] or loader_batch or 32
    if config["chunk_rows"] % config["batch_size"]:
        config["chunk_rows"] -= config["chunk_rows"] % config["batch_size"]
        config["chunk_rows"] = max(config["chunk_rows"], config["batch_size"])
    attributor = _attributor(config, model, dataset)
    if rank == 0:
        store.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(config, indent=1, sort_keys=True))
    timings: dict = {}
    result = attributor.build_store(store, dataset, dtype=config["dtype"], batch_size=config["batch_size"],
                                    chunk_rows=config["chunk_rows"], rank=rank, world=world, timings=timings)
    print(f"rank {rank} of {world}: fingerprints {timings['fingerprints']:.2f} s, featurised "
          f"{timings['rows_written']} rows in {timings['rows']:.2f} s", flush=True)
    if rank == 0 and result is not None:
        print(f"{store}: {result.n_rows} rows x {result.width} ({config['dtype']}), {len(result.shards)} shard(s)")


def query(args: argparse.Namespace) -> None:
    from .store import FeatureStore

    store = FeatureStore.open(args.store)
    saved = Path(args.store) / CONFIG
    if not saved.exists():
        raise SystemExit(f"query: {args.store} has no {CONFIG} (build it with `attrib build`)")
    config = json.loads(saved.read_text())
    model = load_object(args.model or config["model"], "model")
    dataset, _ = _dataset_and_batch(load_object(config["data"], "data"), "data")
    queries, batch = _dataset_and_batch(load_object(args.queries, "queries"), "queries")
    from torch.utils.data import DataLoader

    attributor = _attributor(config, model, dataset)
    train = DataLoader(dataset, batch_size=config["batch_size"])
    attributor.cache(train, stores=[store])  # checks the store holds this model's features of this data
    test = DataLoader(queries, batch_size=batch or config["batch_size"])
    reps = torch.cat(list(attributor._grouped(test, 0, train=False)))  # preconditioned (projected) query gradients
    result = store.topk(reps, min(args.k, store.n_rows), largest=not args.opponents)
    out = Path(args.out)
    if out.suffix == ".npz":
        import numpy as np

        np.savez(out, indices=result.indices.numpy(), scores=result.values.numpy())
    elif out.suffix == ".pt":
        torch.save({"indices": result.indices, "scores": result.values}, out)
    else:
        raise SystemExit(f"--out: expected a .pt or .npz file, got {out}")
    print(f"{out}: top {args.k} {'opponents' if args.opponents else 'proponents'} of {len(reps)} queries")


def info(args: argparse.Namespace) -> None:
    from .store import FeatureStore, StoreCorrupted

    path = Path(args.store)
    try:
        store = FeatureStore.open(path, verify=True)
        status = "complete, every shard's checksum verified"
        manifest = store.manifest
    except StoreCorrupted as error:
        status = f"NOT USABLE: {error}"
        manifest = json.loads((path / "manifest.json").read_text()) if (path / "manifest.json").exists() else {}
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    print(f"store {path}: {status}")
    print(f"rows {manifest.get('rows')}, width {manifest.get('width')}, dtype {manifest.get('dtype')}, "
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
    b.add_argument("--resume", action="store_true", help="continue the build saved in STORE/build.json")
    b.set_defaults(run=build)
    q = commands.add_parser("query", help="exact top-k training rows for queries",
                            description="Exact top-k training rows for each query, streamed over the store.")
    q.add_argument("store")
    q.add_argument("--queries", required=True, help="module:attribute returning the queries' dataset or DataLoader")
    q.add_argument("--model", help="module:attribute (default: the one the store was built with)")
    q.add_argument("--k", type=int, default=10)
    q.add_argument("--opponents", action="store_true", help="the k most negative scores instead")
    q.add_argument("--out", required=True, help="FILE.pt or FILE.npz: indices and scores, (n_queries, k)")
    q.set_defaults(run=query)
    i = commands.add_parser("info", help="the manifest, size and integrity of a store")
    i.add_argument("store")
    i.set_defaults(run=info)
    return top


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()

"""The attribution benchmark: every method's LDS, noisy-label AUC, time and memory on scikit-learn digits.

For each setting (digits + logistic regression, + MLP, + a small CNN; 1,000 training
and 100 test images) and each method, one table row: the linear datamodeling score
against models retrained on random halves of the training set (mean over test images
with a 95% interval), the AUC of finding the 10% flipped labels of the noisy variant
by self influence, the wall time of construction + cache + attribute, and the peak
resident memory it added. The tables go to the terminal and to
``<out>/<setting>.md``, with a plot of LDS against time (``<out>/<setting>.png``);
``--out`` defaults to ``runs/`` (ignored by git), and the tables committed in
``benchmarks/results/`` were written with ``--out benchmarks/results``. The retrained models are cached on disk. With
dattri installed, its attributors run on the identical inputs and hyperparameters and
their LDS is printed beside ours.

Hyperparameters are never chosen on the models the reported LDS uses: the first
``--n-val`` retrained models are a validation split, ``--tune`` searches each method's
grid on them, and the values that ship (``benchmarks/tuned.json``, read by the registry
in ``benchmarks/methods.py``) are its winners.

    python -m benchmarks.run [--setting logreg|mlp|cnn|all] [--methods explicit,cg,...] [--quick] [--tune]

``--quick`` is the main job: digits + logistic regression, every method, fewer
retrained models (about 2 minutes on 2 cores the first time, seconds once cached),
then the strongest proponents and opponents of a few test images.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional

import torch

from attrib_core import lds, mislabel_auc

from . import dattri_methods
from .digits_influence import first_of_each_label, render
from .measure import timed
from .methods import METHODS, attribute, self_influence
from .retrain import LDSTruth, retrain_lds
from .settings import CONVEX, SETTINGS, Setting, make_setting, minus_test_loss

RESULTS = Path(__file__).resolve().parent / "results"
# Training images whose self influence the AUC uses, per setting (default: all). On the CNN an iterative solver
# needs one solve of conv Hessian-vector products per image, so there it is every flipped image and random clean
# ones up to this many: an unbiased estimate of the full AUC, the same images for every method.
AUC_ROWS = {"cnn": 300}


class Row(NamedTuple):
    method: str
    hyper: Dict[str, Any]
    lds: float
    lds_half_width: float
    auc: float
    seconds: float
    peak_mib: float
    dattri: str = ""  # dattri's LDS and time on the same inputs, or why it has none
    scores: Optional[torch.Tensor] = None  # (n_train, n_test), for explaining test images afterwards
    failure: str = ""  # why the method has no numbers on this setting


def failed(method: str, error: Exception) -> Row:
    """A row without numbers, saying why: a method that fails is a result, not a reason to stop the run."""
    nan = float("nan")
    return Row(method, {}, nan, nan, nan, nan, nan, failure=f"{type(error).__name__}: {str(error)[:100]}")


class PeakMemory:
    """The largest resident-set growth while the block runs, sampled every 2 ms from ``/proc/self/statm``."""

    def __init__(self) -> None:
        self.peak_mib = float("nan")
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss(self) -> Optional[int]:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * self._page
        except OSError:
            return None

    def __enter__(self) -> "PeakMemory":
        self._base = self._rss()
        self._top = self._base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            rss = self._rss()
            if rss is not None:
                self._top = max(self._top, rss)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self._base is not None:
            self.peak_mib = (max(self._top, self._rss() or 0) - self._base) / 2**20


def split_truth(truth: LDSTruth, n_val: int) -> tuple[LDSTruth, LDSTruth]:
    """(validation, report): the first ``n_val`` retrained models and the rest."""
    return (LDSTruth(truth.subsets[:n_val], truth.values[:n_val]),
            LDSTruth(truth.subsets[n_val:], truth.values[n_val:]))


def lds_with_interval(scores: torch.Tensor, truth: LDSTruth) -> tuple[float, float]:
    """Mean LDS over test images and the half-width of its 95% normal interval."""
    per_test = lds(scores, truth.values, truth.subsets).per_test
    defined = per_test[~torch.isnan(per_test)]
    if defined.numel() < 2:
        return float(defined.mean()) if defined.numel() else float("nan"), float("nan")
    return float(defined.mean()), 1.96 * float(defined.std()) / math.sqrt(defined.numel())


def auc_rows(is_noisy: torch.Tensor, limit: Optional[int], seed: int) -> Optional[torch.Tensor]:
    """Positions for the noisy-label AUC: all flipped images and uniformly drawn clean ones, ``limit`` in all.

    The AUC is the fraction of (flipped, clean) pairs ordered correctly, so keeping every
    flipped image and a uniform sample of clean ones leaves its expectation unchanged.
    None (every training image) when ``limit`` is None or covers the training set.
    """
    n, flipped = len(is_noisy), torch.nonzero(is_noisy).flatten()
    if limit is None or limit >= n:
        return None
    if limit <= len(flipped):
        raise ValueError(f"--auc-rows: expected more than the {len(flipped)} flipped images, got {limit}")
    clean = torch.nonzero(~is_noisy).flatten()
    drawn = clean[torch.randperm(len(clean), generator=torch.Generator().manual_seed(seed))[: limit - len(flipped)]]
    return torch.sort(torch.cat([flipped, drawn])).values


def tune(setting: Setting, name: str, validation: LDSTruth) -> Dict[str, Any]:
    """The grid point with the best validation LDS (the defaults fill keys the grid leaves out)."""
    method = METHODS[name]
    grid = method.grid_for(setting.name)
    if not grid:
        return method.settings_for(setting.name)
    best, best_lds = method.settings_for(setting.name), -math.inf
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        hyper = {**method.settings_for(setting.name), **dict(zip(keys, values))}
        try:
            score = lds_with_interval(attribute(setting, name, hyper), validation)[0]
        except (ValueError, RuntimeError) as error:  # a grid point the method rejects is no candidate
            print(f"    {name} {hyper}: {type(error).__name__}: {str(error)[:80]}")
            continue
        print(f"    {name} {hyper}: validation LDS {score:.3f}", flush=True)
        if score > best_lds:
            best, best_lds = hyper, score
    if best_lds == -math.inf:
        raise ValueError(f"no point of {name}'s grid ran on {setting.name}: {grid}")
    return best


def evaluate(setting: Setting, noisy: Setting, name: str, hyper: Dict[str, Any], report: LDSTruth,
             with_dattri: bool, rows: Optional[torch.Tensor] = None) -> Row:
    """One table row; the AUC over the training positions ``rows`` (all when None)."""
    with PeakMemory() as memory:
        seconds, scores = timed(lambda: attribute(setting, name, hyper), warmup=False)
    mean, half = lds_with_interval(scores, report)
    flipped = noisy.is_noisy if rows is None else noisy.is_noisy[rows]
    auc = mislabel_auc(self_influence(noisy, name, hyper, rows), flipped).auc
    theirs = versus_dattri(setting, name, hyper, report) if with_dattri and name in dattri_methods.NAMES else ""
    return Row(name, hyper, mean, half, auc, seconds, memory.peak_mib, theirs, scores)


def versus_dattri(setting: Setting, name: str, hyper: Dict[str, Any], report: LDSTruth) -> str:
    """dattri's LDS and time with the same hyperparameters on the same inputs, or how it failed."""
    try:
        seconds, scores = timed(lambda: dattri_methods.attribute(setting, name, hyper), warmup=False)
    except Exception as error:  # noqa: BLE001 - dattri failing is a result to report
        return f"failed: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:60]}"
    if not bool(torch.isfinite(scores).all()):
        return f"NaN/Inf scores ({seconds:.2f} s)"
    mean, half = lds_with_interval(scores.double(), report)
    return f"{mean:.3f} ± {half:.3f} ({seconds:.2f} s)"


def table(setting: str, rows: List[Row], n_report: int, n_val: int, auc_note: str = "") -> str:
    lines = [f"### digits + {setting}: {n_report} retrained models for LDS ({n_val} more for validation)"
             + (f"; {auc_note}" if auc_note else ""), "",
             "| method | LDS (95% interval) | noisy-label AUC | time (s) | peak memory (MiB) | settings | "
             "dattri LDS (time), same inputs |",
             "|---|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r.failure:
            lines.append(f"| {r.method} | failed: {r.failure} | | | | | |")
            continue
        lines.append(f"| {r.method} | {r.lds:.3f} ± {r.lds_half_width:.3f} | {r.auc:.3f} | {r.seconds:.2f} | "
                     f"{r.peak_mib:.0f} | {', '.join(f'{k}={v}' for k, v in r.hyper.items()) or '-'} | "
                     f"{r.dattri or '-'} |")
    return "\n".join(lines)


def plot(setting: str, rows: List[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in (r for r in rows if not r.failure):
        ax.errorbar(r.seconds, r.lds, yerr=r.lds_half_width, fmt="o", capsize=3)
        ax.annotate(r.method, (r.seconds, r.lds), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("wall time, construction + cache + attribute (s, log scale)")
    ax.set_ylabel("LDS (Spearman, mean over test images)")
    ax.set_title(f"digits + {setting}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def explain(setting: Setting, row: Row, show: int = 3, top: int = 3) -> None:
    """Print the strongest proponents and opponents of a few test images by ``row``'s scores, with the images."""
    scores, name = row.scores, row.method
    d = setting.data
    for j in first_of_each_label(d.y_test, show):
        column = scores[:, j]
        pro = torch.topk(column, top).indices.tolist()
        con = torch.topk(column, top, largest=False).indices.tolist()
        print(f"\ntest image {j} (label {int(d.y_test[j])}), by {name}:")
        for kind, picks in (("proponents", pro), ("opponents", con)):
            print(f"  strongest {kind}: " + ", ".join(
                f"#{i} (label {int(d.y_train[i])}, {float(column[i]):+.3g})" for i in picks))
        print(render([d.x_test[j], d.x_train[pro[0]], d.x_train[con[0]]],
                     [f"test {int(d.y_test[j])}", f"pro {int(d.y_train[pro[0]])}", f"con {int(d.y_train[con[0]])}"]))


def run_setting(name: str, methods: List[str], *, n_models: int, n_val: int, do_tune: bool, seed: int,
                n_train: int = 1000, results: Optional[Path] = None, with_dattri: bool = False,
                auc_limit: Optional[int] = None, tag: str = "partial") -> tuple[Setting, List[Row]]:
    """Tune (optionally), evaluate and tabulate ``methods`` on setting ``name``.

    A run of some methods only writes ``<name>-<tag>.md`` (and ``.png``), so it does not
    overwrite the table of a run of all of them, nor, with its own ``tag``, another partial run's.
    """
    if not tag or not all(c.isalnum() or c in "-_" for c in tag):
        raise ValueError(f"tag: expected letters, digits, '-' or '_', got {tag!r}")
    start = time.perf_counter()
    if name in CONVEX and any(m.startswith("trak-") and m != "trak-1" for m in methods):
        print(f"{name} is convex: independently initialised fits are one model, so TRAK ensembles are skipped")
        methods = [m for m in methods if not m.startswith("trak-") or m == "trak-1"]
    ensemble = max([int(m.split("-")[1]) for m in methods if m.startswith("trak-")] + [1])
    setting = make_setting(name, seed=seed, ensemble=ensemble, n_train=n_train)
    noisy = make_setting(name, seed=seed, noisy=True, ensemble=ensemble, n_train=n_train)
    rows_for_auc = auc_rows(noisy.is_noisy, auc_limit, seed)  # a bad limit fails before any retraining
    truth = retrain_lds(setting.train_fn, minus_test_loss(setting.model), setting.data, n_subsets=n_val + n_models,
                        seed=seed, key=setting.key, progress=True)
    validation, report = split_truth(truth, n_val)
    auc_note = "" if rows_for_auc is None else (
        f"AUC over all {int(noisy.is_noisy.sum())} flipped and {len(rows_for_auc) - int(noisy.is_noisy.sum())} "
        f"random clean training images")
    print(f"\ndigits + {name}: models fitted and {n_val + n_models} retrained in {time.perf_counter() - start:.1f} s",
          flush=True)
    rows = []
    for method in methods:
        try:
            hyper = tune(setting, method, validation) if do_tune else METHODS[method].settings_for(name)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # LiSSA/Arnoldi diagnostics are in the numbers
                rows.append(evaluate(setting, noisy, method, hyper, report, with_dattri, rows_for_auc))
        except (ValueError, RuntimeError) as error:
            rows.append(failed(method, error))
            print(f"  {method}: failed: {rows[-1].failure}", flush=True)
            continue
        r = rows[-1]
        print(f"  {method}: LDS {r.lds:.3f} ± {r.lds_half_width:.3f}, AUC {r.auc:.3f}, {r.seconds:.2f} s"
              + (f"; dattri {r.dattri}" if r.dattri else ""), flush=True)
    text = table(name, rows, n_models, n_val, auc_note)
    print("\n" + text)
    folder = results or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    # A run of some methods only must not overwrite the table of a run of all of them.
    single = {m for m in METHODS if not m.startswith("trak-") or m == "trak-1"}  # all but the TRAK ensembles
    suffix = ("-quick" if n_models < 64 else "") + ("" if set(methods) >= single else f"-{tag}")
    (folder / f"{name}{suffix}.md").write_text(text + "\n")
    plot(name, rows, folder / f"{name}{suffix}.png")
    print(f"\nwritten: {folder / f'{name}{suffix}'}.md and .png")
    return setting, rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="all", help=f"one of {SETTINGS} or 'all'")
    parser.add_argument("--methods", default=None, help=f"comma-separated, from {list(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="logistic regression, 24 + 8 retrained models")
    parser.add_argument("--tune", action="store_true", help="choose hyperparameters on the validation models")
    parser.add_argument("--n-models", type=int, default=64, help="retrained models for the reported LDS")
    parser.add_argument("--n-val", type=int, default=16, help="retrained models for validation")
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--dattri", action=argparse.BooleanOptionalAction, default=None,
                        help="run dattri on the same inputs (default: when it is installed, except with --quick)")
    parser.add_argument("--auc-rows", type=int, default=None,
                        help=f"training images for the noisy-label AUC (default: all, except {AUC_ROWS})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="folder for the tables and plots (default: runs/, ignored by git; the committed "
                             "tables were written with --out benchmarks/results)")
    parser.add_argument("--tag", default="partial",
                        help="a run of some methods writes results/<setting>-<tag>.md (default: partial)")
    args = parser.parse_args(argv)
    settings = list(SETTINGS) if args.setting == "all" else args.setting.split(",")
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        parser.error(f"--setting: unknown {sorted(unknown)}; choose from {SETTINGS} or 'all'")
    methods = list(METHODS) if args.methods is None else [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {list(METHODS)}")
    n_models, n_val = args.n_models, args.n_val
    if args.quick:
        settings, n_models, n_val = ["logreg"], 24, 8
    torch.manual_seed(args.seed)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in settings:
        with_dattri = dattri_methods.available() and (args.dattri or (args.dattri is None and not args.quick))
        setting, rows = run_setting(name, methods, n_models=n_models, n_val=n_val, do_tune=args.tune,
                                    seed=args.seed, n_train=args.n_train, with_dattri=with_dattri,
                                    auc_limit=args.auc_rows if args.auc_rows is not None else AUC_ROWS.get(name),
                                    tag=args.tag, results=args.out)
        if args.quick:
            explain(setting, max((r for r in rows if not r.failure), key=lambda r: r.lds))


if __name__ == "__main__":
    main()

"""kronfluence's EK-FAC and K-FAC beside ours: LDS on the benchmark's retrained models, and time.

kronfluence is not a dependency of the project; install it by hand into the
environment without letting pip touch torch (it also declares torchvision, which it
never imports)::

    pip install --no-deps kronfluence==1.0.1 einconv safetensors accelerate

For each setting (default: digits + logistic regression and + MLP), every damping (kronfluence's heuristic,
0.1 times the mean eigenvalue of each layer, and fixed values) gets its LDS on the
16 validation models -- choose on these -- and on the other 64, with a 95% interval,
beside our EK-FAC with its shipped settings. The retrained models are the
benchmark's, cached on disk (``$ATTRIB_CACHE``, default ``~/.cache/attrib``).

    python -m benchmarks.kronfluence_side_by_side [--setting logreg,mlp,logreg-sgd,...]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional

import torch

from . import kronfluence_methods
from .measure import timed
from .methods import METHODS, attribute
from .retrain import retrain_lds
from .run import lds_with_interval, split_truth
from .settings import SETTINGS, make_setting, minus_test_loss

DAMPINGS = (None, 1e-5, 1e-4, 1e-3, 1e-2)  # None: kronfluence's heuristic
N_MODELS, N_VAL = 80, 16


def rows(name: str) -> List[str]:
    """Table rows for one setting: our EK-FAC, then kronfluence's methods at every damping."""
    setting = make_setting(name)
    truth = retrain_lds(setting.train_fn, minus_test_loss(setting.model), setting.data, n_subsets=N_MODELS, seed=0,
                        key=setting.key)
    validation, report = split_truth(truth, N_VAL)

    def row(label: str, hyper: Dict[str, Any], scores_of: Callable[[], torch.Tensor]) -> str:
        seconds, scores = timed(lambda: scores_of().double(), warmup=False)
        val = lds_with_interval(scores, validation)[0]
        mean, half = lds_with_interval(scores, report)
        settings = ", ".join(f"{k}={v}" for k, v in hyper.items()) or "damping=heuristic"
        line = f"| {name} | {label} | {settings} | {val:.3f} | {mean:.3f} ± {half:.3f} | {seconds:.1f} |"
        print(line, flush=True)
        return line

    lines = []
    for ours in dict.fromkeys(kronfluence_methods.OURS.values()):  # the registry's methods kronfluence also has
        shipped = METHODS[ours].settings_for(name)
        lines.append(row(f"ours {ours}", shipped, lambda: attribute(setting, ours, shipped)))
        for method in (strategy for strategy, of in kronfluence_methods.OURS.items() if of == ours):
            for damping in DAMPINGS:
                hyper = {} if damping is None else {"damping": damping}
                lines.append(row(f"kronfluence {method}", hyper,
                                 lambda: kronfluence_methods.attribute(setting, method, hyper)))
    return lines


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", default="logreg,mlp", help=f"comma-separated, from {SETTINGS}")
    args = parser.parse_args(argv)
    if not kronfluence_methods.available():
        raise SystemExit("kronfluence is not installed; see this module's docstring for how to install it")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"LDS on {N_VAL} validation / {N_MODELS - N_VAL} report models\n")
    header = ["| setting | method | settings | validation LDS | report LDS (95% interval) | time (s) |",
              "|---|---|---|---:|---|---:|"]
    print("\n".join(header), flush=True)
    lines = [line for name in args.setting.split(",") for line in rows(name)]
    print("\n" + "\n".join(header + lines))


if __name__ == "__main__":
    main()

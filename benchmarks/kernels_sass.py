"""What the Triton kernels compile to on sm_80 and sm_90a, without a GPU: :mod:`kernels.static_analysis`'s table.

    PYTHONPATH=. python -m benchmarks.kernels_sass [--json] [--arch sm_80,sm_90a] [--only project] [--rows B]
                                                    [--schedules]

Registers, spills, shared memory, tensor-core instructions, the main loop's instruction
mix and integer lane-operations per multiply-add, and the roofline bound (fraction of
dense bf16 tensor-core peak) from the instruction-throughput model documented in
:mod:`kernels.static_analysis`, for every configuration the dispatcher launches. About
40 s on 2 cores (28 compilations); ``--schedules`` adds the three alternative
schedules of each projection that a GPU's timing may choose (``name#i``), 36 more.
"""

from __future__ import annotations

import argparse
import json
from typing import List, Optional

from kernels.static_analysis import ARCHS, analyse, configs


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON record per configuration and architecture")
    parser.add_argument("--arch", default="sm_80,sm_90a")
    parser.add_argument("--only", help="configurations whose name starts with this (e.g. project)")
    parser.add_argument("--rows", type=int, default=4096, help="B: rows of x (gradients) per call; 4096 by default")
    parser.add_argument("--schedules", action="store_true", help="also every alternative schedule of the projection")
    args = parser.parse_args(argv)
    archs = [a for a in args.arch.split(",") if a]
    for arch in archs:
        if arch not in ARCHS:
            raise SystemExit(f"--arch: expected some of {sorted(ARCHS)}, got {arch!r}")
    records = [analyse(c) for arch in archs for c in configs(arch, B=args.rows, only=args.only,
                                                                          schedules=args.schedules)]
    if args.json:
        for record in records:
            print(json.dumps(record, sort_keys=True))
        return
    print("\n| config | arch | warps | registers | spill bytes | shared KiB | tensor-core instr. | "
          "loop int / fp / cvt / tc instr. | loop shared wavefronts / barriers | int lane-ops per MAC | "
          "bound (% of bf16 peak) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---:|---:|")
    for r in records:
        loop = r["loop"]
        ratio = "-" if r["int_lane_ops_per_mac"] is None else f"{r['int_lane_ops_per_mac']:.3f}"
        bound = "-" if r["roofline_fraction_of_bf16_peak"] is None else \
            f"{100 * r['roofline_fraction_of_bf16_peak']:.1f}"
        print(f"| {r['config']} | {r['arch']} | {r['num_warps']} | {r['registers']} | {r['spill_bytes']} | "
              f"{r['shared_bytes'] / 1024:.0f} | {r['tensor_core_instructions']} | "
              f"{loop['int']} / {loop['fp']} / {loop['cvt']} / {loop['tc']} | "
              f"{loop['shared_wavefronts']} / {loop['barriers']} | {ratio} | {bound} |", flush=True)


if __name__ == "__main__":
    main()

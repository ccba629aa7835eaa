"""Kernel microbenchmarks: projection and inner products against a materialised-matrix matmul.

    python -m benchmarks.kernels [--B 256] [--P 1048576] [--k 1024] [--repeats 3]

CPU (always): ``kernels.project`` (rademacher, gaussian, sjlt) against
``torch.matmul`` with the same matrix materialised beforehand, and
``kernels.inner`` / ``kernels.topk_inner`` against ``matmul`` (+ ``torch.topk``),
in one run on the same inputs. GPU (when CUDA is available): the Triton kernels,
the torch reference and the materialised matmul, in TFLOP/s. Without a GPU the
script says so and runs the CPU part only.
"""

from __future__ import annotations

import argparse

import torch

import kernels
from kernels import reference

from .measure import timed


def materialise(P: int, k: int, kind: str, seed: int, device: torch.device) -> torch.Tensor:
    """The whole ``(P, k)`` matrix, scaled, built tile by tile from the same hash."""
    R = torch.empty(P, k, dtype=torch.float32, device=device)
    step = max(1, reference.TILE_ENTRIES // k)
    for start in range(0, P, step):
        stop = min(P, start + step)
        R[start:stop] = reference.dense_tile(seed, torch.arange(start, stop, device=device), k, kind)
    return R * (1.0 / k**0.5)


def row(name: str, seconds: float, flops: float, baseline: float | None, note: str = "") -> str:
    rate = f"{flops / seconds / 1e9:.1f}" if flops else ""
    ratio = f"{baseline / seconds:.2f}" if baseline else ""
    return f"| {name} | {seconds * 1e3:.1f} | {rate} | {ratio} | {note} |"


def cpu_part(args) -> None:
    B, P, k = args.B, args.P, args.k
    x = torch.randn(B, P, generator=torch.Generator().manual_seed(0))
    flops = 2.0 * B * P * k
    lines = []
    R = materialise(P, k, "rademacher", 0, x.device)
    t_mat = timed(lambda: x @ R, args.repeats).seconds
    check = kernels.project(x[:, : min(P, 4096)], k, kind="rademacher")
    torch.testing.assert_close(check, x[:, : min(P, 4096)] @ R[: min(P, 4096)], rtol=1e-4, atol=1e-4)
    R = None  # free the materialised matrix before the next measurements
    lines.append(row("matmul with the materialised matrix (baseline)", t_mat, flops, t_mat,
                     f"matrix {P * k * 4 / 2**30:.2f} GiB held"))
    tile_mib = reference.TILE_ENTRIES * 4 / 2**20
    for kind in ("rademacher", "gaussian"):
        t = timed(lambda: kernels.project(x, k, kind=kind), args.repeats).seconds
        lines.append(row(f"project, {kind}", t, flops, t_mat, f"one {tile_mib:.0f} MiB tile at a time"))
    t_dense = timed(lambda: kernels.project(x, k, kind="rademacher"), 1).seconds
    for nnz in (1, 4):
        t = timed(lambda: kernels.project(x, k, kind="sjlt", nnz=nnz), args.repeats).seconds
        lines.append(row(f"project, sjlt nnz={nnz}", t, 0, t_mat, f"{t_dense / t:.1f}x faster than dense rademacher"))

    n, m = args.n_train, args.n_test
    a = torch.randn(n, k, generator=torch.Generator().manual_seed(1))
    b = torch.randn(m, k, generator=torch.Generator().manual_seed(2))
    inner_flops = 2.0 * n * m * k
    t_mm = timed(lambda: a @ b.T, args.repeats).seconds
    lines.append(row(f"inner {n}x{m}x{k}: matmul (baseline)", t_mm, inner_flops, t_mm))
    t_inner = timed(lambda: kernels.inner(a, b), args.repeats).seconds
    lines.append(row("inner", t_inner, inner_flops, t_mm))
    t_cosine = timed(lambda: kernels.inner(a, b, normalize=True), args.repeats).seconds
    lines.append(row("inner, normalize=True", t_cosine, inner_flops, t_mm))
    t_full = timed(lambda: torch.topk(a @ b.T, 10, dim=0), args.repeats).seconds
    lines.append(row("top-10: matmul + torch.topk (baseline)", t_full, inner_flops, t_full,
                     f"holds {n * m * 4 / 2**20:.0f} MiB of scores"))
    t_stream = timed(lambda: kernels.topk_inner(a, b, 10), args.repeats).seconds
    lines.append(row("top-10: topk_inner (streaming)", t_stream, inner_flops, t_full, "never holds (n, m)"))

    print(f"\nCPU, {torch.get_num_threads()} threads; projection B={B}, P={P:,}, k={k}; medians of {args.repeats}\n")
    print("| operation | time (ms) | GFLOP/s | throughput vs baseline | notes |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(lines))


def gpu_part(args) -> None:
    if not torch.cuda.is_available():
        print("\nGPU: none available here; only the CPU part ran.")
        return
    device = torch.device("cuda")
    B, P, k = args.B, args.P, args.k
    sync = torch.cuda.synchronize
    print(f"\nGPU: {torch.cuda.get_device_name()}, projection B={B}, P={P:,}, k={k}\n")
    print("| operation | dtype | time (ms) | TFLOP/s |")
    print("|---|---|---:|---:|")
    flops = 2.0 * B * P * k
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, P, device=device).to(dtype)
        R = materialise(P, k, "rademacher", 0, device).to(dtype)
        t = timed(lambda: x @ R, args.repeats, sync=sync).seconds
        print(f"| matmul, materialised | {dtype} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} |")
        R = None  # free it before the next kind
        for kind in ("rademacher", "gaussian"):
            t = timed(lambda: kernels.project(x, k, kind=kind), args.repeats, sync=sync).seconds
            print(f"| project {kind}, Triton | {dtype} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} |")
            t = timed(lambda: reference.project_dense(x, k, kind, 0, 0), args.repeats, sync=sync).seconds
            print(f"| project {kind}, torch reference | {dtype} | {t * 1e3:.2f} | {flops / t / 1e12:.1f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=256, help="rows projected at once")
    parser.add_argument("--P", type=int, default=1 << 20, help="input width (gradient size)")
    parser.add_argument("--k", type=int, default=1024, help="projection width")
    parser.add_argument("--n-train", type=int, default=100_000, help="rows of a for inner / top-k")
    parser.add_argument("--n-test", type=int, default=1000, help="rows of b for inner / top-k")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}")
    cpu_part(args)
    gpu_part(args)


if __name__ == "__main__":
    main()

"""Kernel microbenchmarks: projection and inner products against a materialised-matrix matmul.

    python -m benchmarks.kernels [--B 256] [--P 1048576] [--k 1024] [--repeats 3] [--no-cpu]

CPU (always): ``kernels.project`` (rademacher, gaussian, sjlt) against
``torch.matmul`` with the same matrix materialised beforehand, and
``kernels.inner`` / ``kernels.topk_inner`` against ``matmul`` (+ ``torch.topk``),
in one run on the same inputs. GPU (when CUDA is available): first the GPU's
numbers against the CPU's (entries bit for bit, projections and inner products
against float64, top-k against the exact ranking; every schedule the projection's
timing may choose the same bit for bit), then the Triton projection, with its
static plan and tuned (``ATTRIB_TUNE``, :mod:`kernels.tuning`), against cuBLAS on
the materialised matrix, ``inner`` against ``matmul`` and the
fused top-k against ``matmul`` + ``torch.topk``, in TFLOP/s (``--gpu-*`` sizes;
``--no-cpu`` skips the CPU part). Without a GPU the script says so and runs the
CPU part only.
"""

from __future__ import annotations

import argparse
import contextlib
import os

import torch

import kernels
from kernels import reference, tuning

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


def schedules_agree(x: torch.Tensor, dim_out: int, kind: str) -> tuple[int, bool]:
    """How many schedules the projection's timing may choose from on ``x``'s GPU (``project_schedules``), and
    whether every one gives ``x``'s projection bit for bit as the static plan does."""
    from kernels import triton_kernels as tk

    B, P = x.shape
    plans = tk.project_schedules(B, P, dim_out, x.dtype, kind, tk.device_arch(x.device), interpreted=False)
    outs = [tk.project_with_plan(x, dim_out, kind, 5, 11, plan) for plan in plans]
    return len(plans), all(torch.equal(out, outs[0]) for out in outs[1:])


def gpu_checks(device: torch.device) -> bool:
    """The GPU's numbers against the CPU's: matrix entries bit for bit, projections and inner products against
    float64, top-k against the exact ranking (ties to the smaller row); every schedule of the projection the
    same bit for bit. Prints one line each; True if all pass."""
    g = torch.Generator().manual_seed(3)
    results = []
    for kind in ("rademacher", "gaussian"):
        entries = [kernels.projection_entries(300, 200, kind=kind, seed=3, offset=2**33 - 7, device=d).cpu()
                   for d in (device, "cpu")]
        results.append((f"entries, {kind}: bit-identical to the CPU's", torch.equal(*entries)))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for rows in (3, 100, 300):  # one tile of rows, columns split over programs; each table row
                x = torch.randn(rows, 20000, generator=g).to(dtype)
                exact = reference.project_dense(x.double(), 1000, kind, 5, 11)
                got = kernels.project(x.to(device), 1000, kind=kind, seed=5, offset=11).cpu().double()
                error = float((got - exact).abs().max() / exact.abs().max())
                results.append((f"project, {kind}, {dtype}, B={rows}: max error {error:.1e} of the largest", error < 3e-5))
                count, same = schedules_agree(x.to(device), 1000, kind)
                results.append((f"project, {kind}, {dtype}, B={rows}: its {count} schedules bit for bit the same",
                                same))
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(3000, 100, generator=g).to(dtype), torch.randn(70, 100, generator=g).to(dtype)
        for normalize in (False, True):
            exact = a.double() @ b.double().T
            if normalize:
                exact = exact / a.double().norm(dim=1)[:, None] / b.double().norm(dim=1)[None, :]
            got = kernels.inner(a.to(device), b.to(device), normalize=normalize).cpu().double()
            error = float((got - exact).abs().max() / exact.abs().max())
            results.append((f"inner, {dtype}, normalize={normalize}: max error {error:.1e}", error < 1e-5))
    a = torch.randint(-3, 4, (5000, 8), generator=g).float()
    b = torch.randint(-3, 4, (40, 8), generator=g).float()
    for k in (10, 128, 200):  # fused; fused at its largest k; streamed
        order = torch.sort((a @ b.T).T, dim=1, descending=True, stable=True).indices[:, :k]
        top = kernels.topk_inner(a.to(device), b.to(device), k)
        results.append((f"topk_inner, k={k}: the exact ranking with ties", torch.equal(top.indices.cpu(), order)))
    for name, ok in results:
        print(f"| {name} | {'pass' if ok else 'FAIL'} |")
    return all(ok for _, ok in results)


@contextlib.contextmanager
def tuned(on: bool):
    """``ATTRIB_TUNE`` set to ``on`` inside, as it was after."""
    previous = os.environ.get("ATTRIB_TUNE")
    os.environ["ATTRIB_TUNE"] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["ATTRIB_TUNE"]
        else:
            os.environ["ATTRIB_TUNE"] = previous


def gpu_row(name: str, dtype: torch.dtype, seconds: float, flops: float, baseline: float) -> str:
    return f"| {name} | {dtype} | {seconds * 1e3:.2f} | {flops / seconds / 1e12:.1f} | {baseline / seconds:.2f} |"


def gpu_part(args) -> None:
    if not torch.cuda.is_available():
        print("\nGPU: none available here; only the CPU part ran.")
        return
    device = torch.device("cuda")

    def timing(fn):
        return timed(fn, args.repeats, sync=torch.cuda.synchronize)

    def seconds(fn) -> float:
        return timing(fn).seconds

    print(f"\nGPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}\n")
    print("| check | result |\n|---|---|")
    passed = gpu_checks(device)
    B, P, k = args.gpu_B, args.gpu_P, args.gpu_k
    print(f"\nprojection B={B}, P={P:,}, k={k}; medians of {args.repeats}\n")
    print("| operation | dtype | time (ms) | TFLOP/s | vs materialised matmul |\n|---|---|---:|---:|---:|")
    flops = 2.0 * B * P * k
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(B, P, device=device).to(dtype)
        R = materialise(P, k, "rademacher", 0, device).to(dtype)
        t_mat = seconds(lambda: x @ R)
        R = None  # free it before the next kind
        print(gpu_row("matmul, materialised (cuBLAS)", dtype, t_mat, flops, t_mat))
        for kind in ("rademacher", "gaussian"):
            with tuned(False):
                static = timing(lambda: kernels.project(x, k, kind=kind))
            with tuned(True):
                tuned_run = timing(lambda: kernels.project(x, k, kind=kind))  # the warm-up call times the schedules
            taken = [index for key, index in tuning.choices().items() if (key.kind, key.dtype) == (kind, dtype)]
            same = torch.equal(static.result, tuned_run.result)
            passed = passed and same
            print(gpu_row(f"project {kind}, Triton, static plan", dtype, static.seconds, flops, t_mat))
            print(gpu_row(f"project {kind}, Triton, tuned (schedule {taken}; bit for bit the static plan's: "
                          f"{'yes' if same else 'NO, FAIL'})", dtype, tuned_run.seconds, flops, t_mat))
            static = tuned_run = None
        x = None
    n, m, width = args.gpu_n, args.n_test, args.k
    print(f"\ninner and top-10 of {n:,} x {m:,} rows of {width}\n")
    print("| operation | dtype | time (ms) | TFLOP/s | vs baseline |\n|---|---|---:|---:|---:|")
    flops = 2.0 * n * m * width
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, width, device=device).to(dtype)
        b = torch.randn(m, width, device=device).to(dtype)
        t_mm, t_top = seconds(lambda: a @ b.T), seconds(lambda: torch.topk(a @ b.T, 10, dim=0))
        print(gpu_row("matmul (baseline)", dtype, t_mm, flops, t_mm))
        print(gpu_row("inner, Triton", dtype, seconds(lambda: kernels.inner(a, b)), flops, t_mm))
        print(gpu_row("top-10: matmul + torch.topk (baseline)", dtype, t_top, flops, t_top))
        print(gpu_row("top-10: topk_inner, fused", dtype, seconds(lambda: kernels.topk_inner(a, b, 10)), flops, t_top))
        a = b = None
    if not passed:
        raise SystemExit("GPU: some checks FAILED (above)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--B", type=int, default=256, help="rows projected at once")
    parser.add_argument("--P", type=int, default=1 << 20, help="input width (gradient size)")
    parser.add_argument("--k", type=int, default=1024, help="projection width")
    parser.add_argument("--n-train", type=int, default=100_000, help="rows of a for inner / top-k")
    parser.add_argument("--n-test", type=int, default=1000, help="rows of b for inner / top-k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gpu-B", type=int, default=2048, help="GPU: rows projected at once")
    parser.add_argument("--gpu-P", type=int, default=1 << 20, help="GPU: input width")
    parser.add_argument("--gpu-k", type=int, default=4096, help="GPU: projection width")
    parser.add_argument("--gpu-n", type=int, default=1_000_000, help="GPU: rows of a for inner / top-k")
    parser.add_argument("--cpu", action=argparse.BooleanOptionalAction, default=True, help="run the CPU part")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}")
    if args.cpu:
        cpu_part(args)
    gpu_part(args)


if __name__ == "__main__":
    main()

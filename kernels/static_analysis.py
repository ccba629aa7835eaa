"""What the Triton kernels compile to on sm_80 (A100) and sm_90a (H100/H200), read without a GPU.

Every kernel configuration the dispatcher can launch (``kernels/triton_kernels.py``'s
``*_launch`` builders, fed realistic arguments as meta tensors) is bound through
Triton's own JIT binder, so its signature and specialisations (``i32``/``i64``,
constant strides, 16-byte alignment) are those of a real launch, then compiled to PTX
and cubin with the ``ptxas`` inside the triton wheel. :func:`analyse` reports per
configuration and architecture:

- registers, spill bytes (stores + loads, ``ptxas -v`` on the PTX, with the ptxas and
  flags Triton's compile uses), shared memory (against the limit of the smallest GPU
  that takes the configuration), warps;
- tensor-core instructions (``HMMA`` on sm_80, ``HGMMA``/``HMMA`` on sm_90a) in the code;
- in the main loop (the backward branch whose body holds the most multiply-adds),
  per iteration and warp: integer, floating-point, conversion and tensor-core
  instructions, multiply-adds (MACs), and integer lane-operations per MAC;
- a roofline bound from instruction throughput: the fraction of the chip's dense
  bf16 tensor-core rate the loop could reach if every pipe overlapped perfectly and
  global memory were free, ``(MACs / TC) / max(int / INT, fp / FP, cvt / CVT,
  shared / SHARED, MACs / TC)`` with per-SM, per-clock rates (lanes; MACs for tensor
  cores; 128-byte shared-memory wavefronts):

  ====== ===== ===== ===== ====== ===========================
  arch   INT   FP    CVT   SHARED TC (bf16 dense MACs)
  ====== ===== ===== ===== ====== ===========================
  sm_80   64    64    16    1     1024  (A100: 312 TFLOP/s)
  sm_90a  64   128    16    1     2048  (H100 SXM: 989 TFLOP/s)
  ====== ===== ===== ===== ====== ===========================

  A warp instruction counts 32 lane-operations (``IMAD.WIDE`` one instruction, a
  conservative count); ``FFMA`` 32 MACs; ``HMMA.MNK`` ``M·N·K`` MACs; ``HGMMA.MxNxK``
  ``M·N·K / 4`` per warp (one instruction per warpgroup of four warps); a tf32 MAC
  costs two bf16 MACs of tensor-core time, and a ``tf32x3`` product (fp32 inputs as
  three tf32 products: ``inner``, the Gaussian projection) or the three bf16 parts
  of a float32 projection input do one useful MAC per three. ``LDS``/``STS`` and
  the shared-memory writes of ``LDGSTS`` take one wavefront per warp for lanes up to
  32 bits, two for 64, four for 128 (bank conflicts not modelled), ``LDSM`` one per
  8x8 matrix; the tensor cores' own
  operand reads from shared memory (``HGMMA``) are not counted. Barriers
  (``BAR``) are counted, not modelled, as are global loads, stores, moves and
  branches. A bound from the instruction mix only: a static estimate, not a timing.

``python -m benchmarks.kernels_sass`` prints the table (``--json``: one record each).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch

ARCHS = {"sm_80": 80, "sm_90a": 90}
# per SM and clock: integer lanes, fp32 lanes, conversion lanes, dense bf16 tensor-core MACs, 128-byte
# shared-memory wavefronts
RATES = {"sm_80": {"int": 64, "fp": 64, "cvt": 16, "tc": 1024, "shared": 1},
         "sm_90a": {"int": 64, "fp": 128, "cvt": 16, "tc": 2048, "shared": 1}}
# shared memory a block may use on the smallest GPU that takes each tile table: H100/H200 227 KiB; "sm_80" also
# serves sm_86/sm_89 (RTX 30xx/40xx, L4, L40) with 99 KiB (A100: 163 KiB)
SHARED_LIMIT = {"sm_80": 99 * 1024, "sm_90a": 227 * 1024}

_INT = {"IMAD", "IADD3", "IADD", "VIADD", "LOP3", "LOP", "SHF", "SHL", "SHR", "ISETP", "LEA", "IMNMX", "VIMNMX",
        "IABS", "PRMT", "SEL", "ISCADD", "BMSK", "SGXT", "IMUL", "POPC", "FLO", "BREV", "IDP", "IMUL32I",
        "IADD32I", "LOP32I", "ISCADD32I", "UIMAD", "ULOP3", "UIADD3", "USHF", "ULEA", "UISETP", "USEL", "UPRMT"}
_FP = {"FFMA", "FADD", "FMUL", "FMNMX", "FSETP", "FSEL", "FCHK", "FSWZADD", "HFMA2", "HADD2", "HMUL2"}
_CVT = {"I2F", "F2I", "F2F", "I2I", "F2FP", "I2FP", "F2IP", "FRND"}
_TC = {"HMMA", "HGMMA", "IMMA", "DMMA"}


class Config(NamedTuple):
    name: str
    arch: str  # "sm_80" or "sm_90a": the tile table the dispatcher takes on that GPU generation
    launch: Any  # kernels.triton_kernels.Launch
    tensor_cores: bool  # meant to run on tensor cores


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def project_config(arch: str, kind: str, dtype: torch.dtype, B: int, P: int, K: int, schedule: int = 0) -> Config:
    """The projection launch :func:`kernels.triton_kernels.project_dense` makes on ``arch`` for ``x`` ``(B, P)``
    of ``dtype`` (a float32 Rademacher input: the launch over one chunk of its bf16 parts), with the static plan
    or (``schedule`` ``i > 0``) the ``i``-th alternative a GPU's timing may choose instead (named ``...#i``)."""
    from kernels import triton_kernels as tk

    plan = tk.project_schedules(B, P, K, dtype, kind, arch, interpreted=False)[schedule]
    columns = min(P, plan.chunk)
    x = _meta(3, B, columns, dtype=torch.bfloat16) if plan.parts == 3 else _meta(B, columns, dtype=dtype)[None]
    launch = tk.project_launch(x, _meta(plan.splits, B, K), _meta(65536), kind, 0, 0, plan)
    return Config(f"project/{kind}/{str(dtype)[6:]}" + (f"#{schedule}" if schedule else ""), arch, launch,
                  plan.dot != 0)


def configs(arch: str, B: int = 4096, P: int = 1 << 24, K: int = 8192, only: Optional[str] = None,
            schedules: bool = False) -> List[Config]:
    """The configurations the dispatcher launches on ``arch``, with arguments of a realistic size (``B`` gradients
    of ``P`` parameters projected to ``K``; ``inner`` of ``B`` by ``B`` rows of ``K``); with ``schedules``, every
    alternative schedule of each projection too."""
    from kernels import triton_kernels as tk

    out = []
    for kind in ("rademacher", "gaussian"):
        out.append(Config(f"entries/{kind}", arch, tk.entries_launch(_meta(B, K), _meta(65536), 0, 0, kind), False))
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            count = len(tk.project_schedules(B, P, K, dtype, kind, arch, interpreted=False)) if schedules else 1
            out.extend(project_config(arch, kind, dtype, B, P, K, schedule) for schedule in range(count))
    for normalize in (False, True):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            launch = tk.inner_launch(_meta(B, K, dtype=dtype), _meta(B, K, dtype=dtype), _meta(B, B), normalize)
            out.append(Config(f"inner/{'cosine' if normalize else 'dot'}/{str(dtype)[6:]}", arch, launch,
                              True))  # fp32 through tf32x3, fp16/bf16 directly
    for k in (10, 100):  # the fused top-k: 2^20 candidate rows of width K / 64, B queries
        for dtype in (torch.float32, torch.bfloat16):
            out.append(topk_config(arch, dtype, 1 << 20, B, K // 64, k))
    return [c for c in out if only is None or c.name.startswith(only)]


def topk_config(arch: str, dtype: torch.dtype, n: int, m: int, width: int, k: int) -> Config:
    """The fused top-k launch :func:`kernels.triton_kernels.topk` makes for ``n`` candidates, ``m`` queries."""
    from kernels import triton_kernels as tk

    plan = tk.topk_plan(n, m, k)
    keys = _meta(m, plan.chunks, plan.block_n, dtype=torch.int64)
    bad = _meta(-(-m // plan.block_m), plan.chunks, dtype=torch.int32)
    launch = tk.topk_launch(_meta(n, width, dtype=dtype), _meta(m, width, dtype=dtype), keys, bad, plan, True, False)
    return Config(f"topk/k={k}/{str(dtype)[6:]}", arch, launch, True)


def _bin(tool: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


def bound_source(config: Config) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(source, target, options)``: the launch's arguments bound by Triton's JIT binder for ``config.arch``, the
    signature and specialisations a real launch of them would compile."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel, args, meta = config.launch.kernel, config.launch.args, dict(config.launch.meta)
    target = GPUTarget("cuda", ARCHS[config.arch], 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options.__dict__


def compile_config(config: Config) -> Any:
    """The launch compiled (PTX, cubin) for ``config.arch`` as a real launch would compile it."""
    from triton.compiler import compile as triton_compile

    source, target, options = bound_source(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return triton_compile(source, target=target, options=options)


def _ptxas_report(ptx: str, arch: str) -> Dict[str, int]:
    """``ptxas -v`` on the PTX, with the ptxas and the flags Triton's own compile uses for ``arch``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "k.ptx"
        source.write_text(ptx)
        command = [get_ptxas(ARCHS[arch]).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}",
                   str(source), "-o", str(Path(tmp) / "k.cubin")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    text = done.stdout + done.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack": number(r"(\d+) bytes stack frame")}


def _sass(cubin: bytes) -> List[str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([_bin("nvdisasm"), str(path)], capture_output=True, text=True, check=True).stdout
    return text.splitlines()


_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Za-z0-9_.]+)?\b")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def _macs(opcode: str, suffix: str) -> int:
    if opcode == "FFMA":
        return 32
    if opcode in ("HMMA", "IMMA"):
        digits = suffix.split(".")[1] if suffix else ""
        shapes = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "16832": (16, 8, 32)}
        m, n, k = shapes.get(digits, (0, 0, 0))
        return m * n * k
    if opcode == "HGMMA":
        shape = re.match(r"\.(\d+)x(\d+)x(\d+)", suffix or "")
        return (int(shape.group(1)) * int(shape.group(2)) * int(shape.group(3))) // 4 if shape else 0
    return 0


def _instructions(lines: Sequence[str]) -> Iterator[Tuple[str, str]]:
    """``(opcode, suffix)`` of each instruction in ``lines`` (``suffix``: the dotted modifiers, ``""`` if none)."""
    for line in lines:
        match = _INSTRUCTION.match(line)
        if match:
            yield match.group(3), match.group(4) or ""


def _mix(lines: Sequence[str]) -> Dict[str, int]:
    """Instruction counts by pipe, the multiply-adds they do (``macs``), and ``tc_cost``: the tensor-core MACs in
    units of bf16 MACs (a tf32 MAC costs two: the tf32 rate is half the bf16 rate)."""
    counts = {"int": 0, "fp": 0, "cvt": 0, "tc": 0, "memory": 0, "other": 0, "macs": 0, "tc_cost": 0,
              "shared_wavefronts": 0, "barriers": 0}
    for opcode, suffix in _instructions(lines):
        macs = _macs(opcode, suffix)
        counts["macs"] += macs
        if opcode in _TC:
            counts["tc_cost"] += macs * (2 if "TF32" in suffix else 1)
            counts["tc"] += 1
        elif opcode in _INT:
            counts["int"] += 1
        elif opcode in _FP:
            counts["fp"] += 1
        elif opcode in _CVT:
            counts["cvt"] += 1
        elif opcode.startswith(("LD", "ST", "ATOM", "RED", "CP", "UBLKCP", "UTMA", "SYNCS")):
            counts["memory"] += 1
            counts["shared_wavefronts"] += _wavefronts(opcode, suffix)
        else:
            counts["other"] += 1
            counts["barriers"] += opcode == "BAR"
    return counts


def _tensor_core_kinds(lines: Sequence[str]) -> List[str]:
    """The tensor-core instructions in ``lines`` by opcode and operand types, shape left out (``HGMMA.F32.BF16``)."""
    kinds = set()
    for opcode, suffix in _instructions(lines):
        if opcode in _TC:
            kinds.add(".".join([opcode] + [t for t in suffix.split(".") if re.fullmatch(r"[A-Z]+\d*", t)]))
    return sorted(kinds)


def _wavefronts(opcode: str, suffix: str) -> int:
    """Cycles of the SM's shared-memory pipe (128 bytes a cycle) a warp's ``LDS``/``STS``/``LDGSTS`` (an async copy
    from global memory, written to shared memory)/``LDSM`` takes, bank conflicts aside: one for up to 32-bit lanes,
    two for 64-bit, four for 128-bit; ``LDSM`` (``.MT88`` transposed too) one per 8x8 matrix."""
    if opcode == "LDSM":
        matrices = re.search(r"\.MT?88\.(\d)", suffix)
        return int(matrices.group(1)) if matrices else 1
    if opcode in ("LDS", "STS", "LDGSTS"):
        return 4 if ".128" in suffix else 2 if ".64" in suffix else 1
    return 0


def main_loop(sass: Sequence[str]) -> List[str]:
    """The instructions of the loop (a backward branch to an earlier label) holding the most multiply-adds."""
    labels = {}
    for i, line in enumerate(sass):
        match = _LABEL.match(line.strip())
        if match:
            labels[match.group(1)] = i
    best, best_macs = [], -1
    for i, line in enumerate(sass):
        match = _BRANCH.search(line)
        if match and match.group(1) in labels and labels[match.group(1)] < i:
            body = sass[labels[match.group(1)] : i + 1]
            macs = _mix(body)["macs"]
            if macs > best_macs:
                best, best_macs = body, macs
    return best


def analyse(config: Config) -> Dict[str, Any]:
    arch = config.arch
    compiled = compile_config(config)
    report = _ptxas_report(compiled.asm["ptx"], arch)
    sass = _sass(compiled.asm["cubin"])
    whole = _mix(sass)
    loop = _mix(main_loop(sass))
    rates = RATES[arch]
    record: Dict[str, Any] = {
        "config": config.name, "arch": arch, "registers": report["registers"],
        "spill_bytes": report["spill_stores"] + report["spill_loads"], "shared_bytes": int(compiled.metadata.shared),
        "shared_limit_bytes": SHARED_LIMIT[arch],
        "num_warps": int(compiled.metadata.num_warps), "tensor_core_instructions": whole["tc"],
        "tensor_core_kinds": _tensor_core_kinds(sass),
        "meant_for_tensor_cores": config.tensor_cores, "loop": loop,
        "signature": {k: v for k, v in compiled.src.signature.items()},
    }
    if loop["macs"]:
        lane = {key: 32 * loop[key] for key in ("int", "fp", "cvt")}
        # tf32x3 (fp32 inner, the Gaussian projection) and the three bf16 parts of a float32 projection input do three
        # tensor-core products per useful multiply-add
        meta = config.launch.meta
        three = meta.get("PRECISION") == "tf32x3" or meta.get("DOT") == 2 or meta.get("PARTS") == 3
        useful = loop["macs"] / 3 if three else loop["macs"]
        cycles = max(lane["int"] / rates["int"], lane["fp"] / rates["fp"], lane["cvt"] / rates["cvt"],
                     loop["tc_cost"] / rates["tc"], loop["shared_wavefronts"] / rates["shared"])
        record["useful_macs"] = useful
        record["int_lane_ops_per_mac"] = lane["int"] / useful
        record["roofline_fraction_of_bf16_peak"] = min(1.0, (useful / rates["tc"]) / cycles) if cycles else None
    else:
        record["int_lane_ops_per_mac"] = None
        record["roofline_fraction_of_bf16_peak"] = None
    return record

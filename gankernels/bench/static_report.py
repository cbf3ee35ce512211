"""The static performance bound of the Triton conv kernels, read from their sm_90 machine code.

Runs without a GPU: ``python -m gankernels.bench static`` (or ``python -m
gankernels.bench.static_report``). For each Triton conv kernel (forward ``conv3x3``,
``conv3x3_pool``, ``up_conv3x3``; the backward's dgrad and wgrad of the two blocks) on
each ANCHORS.md row (batch 64, bf16, channels_last, leaky ReLU with bias), it compiles
the kernel for sm_90 with Triton's bundled ptxas (:mod:`gankernels.bench.aot`), finds
the main K loop in the SASS (:mod:`gankernels.bench.sass`) and reports:

* instructions per K-step per warp, by class (tensor-core, memory, integer, other);
* tensor-core cycles per step: the step's multiply-adds (read off the MMA instructions)
  ÷ 2048 (an H100/H200 SM's dense bf16 rate per cycle);
* the *issue load*: a scheduler's cycles to issue its warps' share of one step
  (instructions per warp × warps per scheduler; an SM has 4 schedulers issuing one
  instruction per cycle each) ÷ the tensor-core cycles of that step. Above 1 the tensor
  cores cannot be kept busy whatever the memory system does; the *ceiling* is
  min(1, 1/load) of the tensor-core peak. It is an upper bound, not a time: it ignores
  every stall (memory latency, barriers, dependencies) and the prologue/epilogue;
* registers, spilled bytes, shared memory, CTAs per SM (registers, shared memory,
  threads), and the global-memory bytes one step's loads move (every thread counted);
* for rows whose K axis is too short for the tensor cores to bound them (the 3-channel
  first layer: K = 27 in one 32-deep step), the bound that does apply: the *epilogue
  floor* (the issue load the per-element epilogue alone costs, 16·e/K for e instructions
  per output element) and the *memory-time load*: a whole CTA's issue cycles per
  scheduler ÷ the cycles its share of the layer's compulsory HBM traffic takes at one
  SM's share of the measured copy bandwidth. Also an upper bound, not a time.

Which configuration: the autotuned kernels have no GPU to tune on here, so each kernel
is compiled with the *first configuration of its list that survives the kernel's own
pruning* for the shape — what ``GANKERNELS_TRITON_AUTOTUNE=0`` launches for the
forward, and the lists are ordered most-generally-good first. ``--all-configs`` adds
every surviving configuration (what the autotuner would time).

Results go to ``benchmarks/results/static-<triton version>/`` as ``static.json`` and
``static.md`` (``all-configs.*`` with ``--all-configs``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import sys
from pathlib import Path
from typing import Optional

from gankernels.bench import sass

TARGET_ARCH = 90
SCHEDULERS_PER_SM = 4
# sm_90 per-SM limits (CUDA occupancy calculator values for compute capability 9.0).
SM90_REGISTERS = 65536
SM90_REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SM90_SMEM_BYTES = 228 * 1024
SM90_SMEM_RESERVED_PER_CTA = 1024
SM90_MAX_THREADS = 2048
SM90_MAX_CTAS = 32

# The memory side, for the rows the tensor cores cannot bound: the H200's measured device
# copy bandwidth (ANCHORS.md: 4.25 TB/s, bytes read + written) shared by its 132 SMs at
# its 1.98 GHz boost clock (both read on the device machine: PyTorch's multiprocessor
# count, nvidia-smi's SM clock under load), about 16.3 bytes per SM cycle.
COPY_BYTES_PER_S = 4.25e12
H200_SMS = 132
H200_SM_CLOCK_HZ = 1.98e9
HBM_BYTES_PER_SM_CYCLE = COPY_BYTES_PER_S / (H200_SMS * H200_SM_CLOCK_HZ)
ELEMENT_BYTES = 2  # bf16, the report's dtype
# Instructions per output element and thread any epilogue of these rows issues (bias with
# leaky ReLU into bf16): the bias add (or the accumulator's bias initialisation), the
# activation as max(p, alpha·p) (a multiply and a max: exact for 0 < alpha <= 1, what the
# narrow-input path issues), half of a two-value bf16 pack. Stores, their addresses and
# layout conversion come on top, so the floor it gives is a lower bound.
EPILOGUE_INSTRUCTIONS_PER_ELEMENT = 3.5
LANES_PER_WARP = 32

BOUND_NOTE = (
    "An upper bound from the sm_90 machine code, not a time: it counts the instructions one main-loop step issues "
    "and ignores every stall (memory latency, barriers, dependencies) and the prologue and epilogue."
)

DIRECTIONS = {
    "_conv3x3_fwd_kernel": "forward",
    "_up_conv3x3_fwd_kernel": "forward",
    "_up_conv3x3_pairs_fwd_kernel": "forward",
    "_dgrad_kernel": "dgrad",
    "_wgrad_kernel": "wgrad",
}
OPS = {"conv": "conv3x3", "pool": "conv3x3_pool", "up": "up_conv3x3"}


def useful_tensor_fraction(jit_name: str, h: int) -> float:
    """Of the multiply-adds a kernel's MMAs execute, the fraction the convolution needs (1
    unless some multiply zeros or rows it throws away). The row-pair up-conv runs H + 1
    row pairs for H input rows: the first and last pairs hold one output row each, the
    other's products are computed and masked."""
    if jit_name == "_up_conv3x3_pairs_fwd_kernel":
        return h / (h + 1)
    return 1.0


@dataclasses.dataclass
class Row:
    """One kernel, shape and configuration, measured statically."""

    kernel: str  # "forward", "dgrad" or "wgrad"
    op: str  # conv3x3, conv3x3_pool, up_conv3x3
    shape: str  # "Ci->Co @H" (H: the input's height)
    config: str  # e.g. 128x128x64w8s4 (block sizes in the kernel's order, warps, stages)
    preferred: bool  # the first surviving configuration (what is reported by default)
    case_id: str
    blocks: dict  # the configuration's BLOCK_* sizes
    num_warps: int = 0
    tile_macs: int = 0  # product of the BLOCK_* sizes: one step's multiply-adds per CTA
    steps_per_iteration: float = 0.0  # loop iterations hold this many K-steps (1 unless unrolled)
    loop_instructions: int = 0  # per warp, one loop iteration
    whole_kernel: bool = False  # no K loop (a single step): the whole kernel counted as one step
    outside_loop_instructions: int = 0  # per warp: prologue and epilogue (each issued once per CTA)
    cta_issue_load: float = 0.0  # (outside + k_steps · per step) · warps/scheduler ÷ (k_steps · tensor cycles); 0: unknown
    inner_branches: bool = False  # the loop body branches: counts are its longest path
    instructions_per_step: float = 0.0  # per warp
    by_class: dict = dataclasses.field(default_factory=dict)  # per warp per step
    tensor_cycles_per_step: float = 0.0
    warps_per_scheduler: int = 0
    issue_load: float = 0.0
    ceiling: float = 0.0  # min(1, 1/issue_load): fraction of tensor-core peak at best
    useful_tensor_fraction: float = 1.0  # of the executed multiply-adds, those the convolution needs
    useful_issue_load: float = 0.0  # issue_load ÷ useful_tensor_fraction: against the useful tensor cycles
    epilogue_floor_load: float = 0.0  # the epilogue's own issue load over a CTA's whole K (0: K unknown)
    hbm_bytes_per_cta: float = 0.0  # the CTA's share of the layer's compulsory HBM bytes (0: not modelled)
    memory_time_load: float = 0.0  # whole-CTA issue cycles per scheduler ÷ its HBM bytes' cycles (0: not modelled)
    registers: int = -1
    spill_bytes: int = -1
    smem_bytes: int = 0
    ctas_per_sm: int = 0
    cta_limit: str = ""  # what limits CTAs per SM
    global_bytes_per_step: float = 0.0  # per CTA, every thread of every load counted
    k_steps: int = 0  # K-steps one CTA runs (forward, dgrad); 0: depends on the GPU (wgrad's split)
    top_opcodes: dict = dataclasses.field(default_factory=dict)
    error: str = ""

    @property
    def key(self) -> str:
        return f"{self.kernel} {self.op} {self.shape} {self.config}"

    @property
    def memory_bound(self) -> bool:
        """The tensor-core target cannot apply: the epilogue alone costs more issue than
        :data:`TENSOR_TARGET` of the tensor time (a short K axis), so the row is judged on its
        memory-time load."""
        return self.epilogue_floor_load > TENSOR_TARGET

    @property
    def judged_load(self) -> float:
        """The load the ≤ 0.5 target is judged on: the memory-time load where the row is
        memory-bound, else the useful-cycle issue load."""
        return self.memory_time_load if self.memory_bound else self.useful_issue_load


TENSOR_TARGET = 0.5  # issue 14: half the issue slots left for what the memory system costs


def epilogue_floor_load(k_total: int, macs_per_cycle: int) -> float:
    """The issue load the epilogue alone puts on a CTA whose whole K axis is ``k_total``
    deep: e instructions per output element (:data:`EPILOGUE_INSTRUCTIONS_PER_ELEMENT`), a
    warp instruction covering 32 elements on one of 4 schedulers, e/128 cycles per element,
    against the k_total/rate tensor cycles of that element: 16·e/K for bf16. 1.75 at K = 32
    (Ci = 3), 0.10 at K = 576 (Ci = 64)."""
    issue_per_element = EPILOGUE_INSTRUCTIONS_PER_ELEMENT / (LANES_PER_WARP * SCHEDULERS_PER_SM)
    return issue_per_element / (k_total / macs_per_cycle)


def forward_hbm_bytes(op: str, ci: int, co: int, h: int, n: int) -> float:
    """The forward conv or pooled conv layer's compulsory HBM traffic (bf16, batch ``n``,
    H = W = ``h``): the output written once (the pooled op: value and int8 position per
    pooled pixel), the input, weights and bias read once."""
    if op == "conv":
        out_bytes = n * co * h * h * ELEMENT_BYTES
    elif op == "pool":
        out_bytes = n * co * (h // 2) * (h // 2) * (ELEMENT_BYTES + 1)
    else:
        raise ValueError(f"op: the compulsory bytes are modelled for 'conv' and 'pool', not {op!r}")
    in_bytes = n * ci * h * h * ELEMENT_BYTES
    param_bytes = (9 * ci * co + co) * ELEMENT_BYTES
    return float(out_bytes + in_bytes + param_bytes)


def forward_hbm_bytes_per_cta(jit_name: str, op: str, ci: int, co: int, h: int, blocks: dict, n: int) -> float:
    """A CTA's share of :func:`forward_hbm_bytes`. Modelled for the implicit-GEMM kernel's
    conv and pool (one CTA per BLOCK_M pixel rows × BLOCK_N output channels); 0 elsewhere."""
    if jit_name != "_conv3x3_fwd_kernel" or op not in ("conv", "pool"):
        return 0.0
    rows = n * h * h if op == "conv" else n * (h // 2) * (h // 2) * 4  # GEMM rows (pool: 4 per pooled pixel)
    ctas = math.ceil(rows / blocks["BLOCK_M"]) * math.ceil(co / blocks["BLOCK_N"])
    return forward_hbm_bytes(op, ci, co, h, n) / ctas


def ctas_per_sm(num_warps: int, registers: int, smem: int) -> tuple[int, str]:
    """CTAs of this kernel that fit one sm_90 SM, and the resource that limits them."""
    per_warp_regs = math.ceil(registers * 32 / SM90_REG_ALLOC_UNIT) * SM90_REG_ALLOC_UNIT
    limits = {
        "registers": (SM90_REGISTERS // per_warp_regs) // num_warps if per_warp_regs else SM90_MAX_CTAS,
        "shared memory": SM90_SMEM_BYTES // (smem + SM90_SMEM_RESERVED_PER_CTA),
        "threads": SM90_MAX_THREADS // (32 * num_warps),
        "CTA slots": SM90_MAX_CTAS,
    }
    what = min(limits, key=limits.get)
    return limits[what], what


def k_steps(kernel: str, op: str, ci: int, co: int, blocks: dict, jit_name: str = "") -> int:
    """K-steps (BLOCK_M×BLOCK_N×BLOCK_K products) of one CTA: taps × channel chunks (the
    forward merges taps and channels into one K axis below 16 input channels; the
    four-phase up-conv runs 4 phases × 4 taps per chunk). 0 for wgrad, whose steps per
    CTA depend on the GPU's SM count (its split-K)."""
    if jit_name == "_up_conv3x3_fwd_kernel":
        return 16 * math.ceil(ci / blocks["BLOCK_K"])
    if jit_name == "_up_conv3x3_pairs_fwd_kernel":  # 4 dots of 2·BLOCK_K × 2·BLOCK_N per chunk
        return 16 * math.ceil(ci / blocks["BLOCK_K"])
    taps = 4 if op == "up" and kernel == "forward" else 16 if op == "up" else 9
    if kernel == "forward":
        bk = blocks["BLOCK_K"]
        return math.ceil(taps * ci / bk) if ci < 16 else taps * math.ceil(ci / bk)
    if kernel == "dgrad":
        return taps * math.ceil(co / blocks["BLOCK_K"])
    return 0


def analyse_sass(row: Row, text: str, function: str, config_blocks: dict) -> Row:
    """Fill ``row``'s loop measures from the SASS ``text`` of ``function``."""
    instructions = sass.parse(text, function)
    loop = sass.main_loop(instructions)
    row.whole_kernel = loop.start == instructions[0].address and loop.body[-1] is instructions[-1]
    macs, rate = 0, 0
    for ins in loop.body:
        if ins.klass != "tensor":
            continue
        m, dtype, scope = sass.mma_macs(ins)
        # A warpgroup's 4 warps each issue an HGMMA and compute its product once together.
        macs += m * (row.num_warps // 4 if scope == "warpgroup" else row.num_warps)
        rate = sass.SM90_MACS_PER_CYCLE[dtype]
    row.tile_macs = math.prod(v for k, v in config_blocks.items() if k.startswith("BLOCK_"))
    row.steps_per_iteration = macs / row.tile_macs
    row.loop_instructions = loop.size
    row.outside_loop_instructions = 0 if row.whole_kernel else len(instructions) - loop.size
    row.inner_branches = loop.has_inner_branches()
    steps = row.steps_per_iteration
    row.instructions_per_step = loop.size / steps
    row.by_class = {k: v / steps for k, v in loop.by_class().items()}
    row.tensor_cycles_per_step = row.tile_macs / rate
    row.warps_per_scheduler = math.ceil(row.num_warps / SCHEDULERS_PER_SM)
    row.issue_load = row.instructions_per_step * row.warps_per_scheduler / row.tensor_cycles_per_step
    row.ceiling = min(1.0, 1.0 / row.issue_load)
    row.useful_issue_load = row.issue_load / row.useful_tensor_fraction
    bytes_per_warp = sum(sass.global_bytes_per_warp(i) for i in loop.body)
    row.global_bytes_per_step = bytes_per_warp * row.num_warps / steps
    row.top_opcodes = dict(loop.opcodes().most_common(12))
    if row.k_steps and not row.whole_kernel:
        issue = row.outside_loop_instructions + row.k_steps * row.instructions_per_step
        row.cta_issue_load = issue * row.warps_per_scheduler / (row.k_steps * row.tensor_cycles_per_step)
    if row.k_steps and row.hbm_bytes_per_cta:
        # The implicit-GEMM forward: each output element's K is the CTA's k_steps·BLOCK_K.
        row.epilogue_floor_load = epilogue_floor_load(row.k_steps * config_blocks["BLOCK_K"], rate)
        # One whole-kernel step, or k_steps loop steps and the code outside the loop.
        per_warp = row.instructions_per_step if row.whole_kernel else issue
        memory_cycles = row.hbm_bytes_per_cta / HBM_BYTES_PER_SM_CYCLE
        row.memory_time_load = per_warp * row.warps_per_scheduler / memory_cycles
    return row


def analyse_case(case, row: Row) -> Row:
    """Compile ``case`` (an :class:`gankernels.bench.aot.Case`) and measure it into ``row``."""
    from gankernels.bench import aot

    try:
        k = aot.compile_case(case)
        row.num_warps = k.metadata.num_warps
        row.smem_bytes = k.metadata.shared
        cubin = k.asm["cubin"]
        row.registers, row.spill_bytes = aot.resource_usage(cubin, k.metadata.name)
        row.ctas_per_sm, row.cta_limit = ctas_per_sm(row.num_warps, row.registers, row.smem_bytes)
        analyse_sass(row, aot.cuobjdump(cubin, "-sass"), k.metadata.name, row.blocks)
    except Exception as e:  # noqa: BLE001 - the report shows the failure in its row
        row.error = f"{type(e).__name__}: {e}"[:2000]
    return row


def rows_to_measure(all_configs: bool) -> list[tuple[object, Row]]:
    """(case, empty row) for every kernel × ANCHORS row × configuration to measure."""
    from gankernels.bench import aot

    todo = []

    def add(launches, op: str, ci: int, co: int, h: int) -> None:
        for la in launches:
            kernel = DIRECTIONS.get(la.name)
            if kernel is None:
                continue
            configs = aot.autotune_configs(la, TARGET_ARCH)
            for rank, cfg in enumerate(configs if all_configs else configs[:1]):
                label = aot.cfg_label(cfg)
                case = aot.bind(la, TARGET_ARCH, cfg, f"{aot.shape_label(op, ci, co, h)}-{label}")
                row = Row(kernel, OPS[op], shape_of(ci, co, h), label, rank == 0, case.id, dict(cfg.kwargs))
                row.k_steps = k_steps(kernel, op, ci, co, cfg.kwargs, la.name)
                row.useful_tensor_fraction = useful_tensor_fraction(la.name, h)
                if kernel == "forward":
                    row.hbm_bytes_per_cta = forward_hbm_bytes_per_cta(la.name, op, ci, co, h, cfg.kwargs, aot.N)
                todo.append((case, row))

    def shape_of(ci: int, co: int, h: int) -> str:
        return f"{ci}->{co} @{h}"

    for op, rows in (("conv", aot.DISC), ("pool", aot.DISC), ("up", aot.GEN)):
        for ci, co, h in rows:
            add(aot.conv_fwd_launches(op, ci, co, h, "bf16", True), op, ci, co, h)
    for op, rows in (("pool", aot.DISC), ("up", aot.GEN)):
        for ci, co, h in rows:
            # The first discriminator layer reads the image: its input needs no gradient.
            needs = (False, True, True) if (op, ci) == ("pool", 3) else (True, True, True)
            add(aot.conv_bwd_launches(op, ci, co, h, "bf16", True, needs=needs), op, ci, co, h)
    return todo


def measure(all_configs: bool = False, jobs: int = 1, only: Optional[list[str]] = None) -> list[Row]:
    """Compile and measure every row (``only``: keep rows whose key contains one of
    these substrings). Compiles go through Triton's on-disk cache."""
    todo = rows_to_measure(all_configs)
    if only:
        todo = [(c, r) for c, r in todo if any(s in r.key for s in only)]
    if jobs <= 1:
        return [analyse_case(c, r) for c, r in todo]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(analyse_case, [c for c, _ in todo], [r for _, r in todo]))


# ----------------------------------------------------------------------------------
# Output.


def triton_version() -> str:
    import triton

    return triton.__version__


def default_out_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results" / f"static-{triton_version()}"


def to_json(rows: list[Row], all_configs: bool) -> dict:
    return {
        "what": "static issue-load bound of the Triton conv kernels on sm_90 (H100/H200)",
        "note": BOUND_NOTE,
        "triton": triton_version(),
        "target": f"sm_{TARGET_ARCH}",
        "shapes": "ANCHORS.md rows: batch 64, bf16, channels_last, leaky ReLU 0.2 with bias",
        "configs": "every surviving autotune configuration" if all_configs else "first surviving configuration",
        "tensor_macs_per_cycle_per_sm": sass.SM90_MACS_PER_CYCLE["BF16"],
        "hbm_bytes_per_sm_cycle": HBM_BYTES_PER_SM_CYCLE,
        "hbm_bytes_per_sm_cycle_from": (
            f"{COPY_BYTES_PER_S:g} B/s measured copy (ANCHORS.md) / ({H200_SMS} SMs · {H200_SM_CLOCK_HZ:g} Hz)"
        ),
        "epilogue_instructions_per_element": EPILOGUE_INSTRUCTIONS_PER_ELEMENT,
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def markdown(rows: list[Row], all_configs: bool) -> str:
    lines = [
        f"# Static issue-load bound, sm_90, triton {triton_version()}",
        "",
        f"**{BOUND_NOTE}**",
        "",
        "Issue load = (instructions per K-step per warp × warps per scheduler) ÷ tensor-core cycles per step "
        "(BM·BN·BK / 2048 for bf16). Ceiling = min(1, 1/load) of the tensor-core peak. "
        "Batch 64, bf16, channels_last, leaky ReLU with bias; "
        + ("every surviving autotune configuration (★ the first)." if all_configs else "the first surviving configuration.")
        + " Produced by `python -m gankernels.bench static` (method: `benchmarks/NOTES.md`).",
        "",
        "The bound covers the main loop only: where a CTA runs few K-steps (the 3-channel first layer runs one) "
        "the prologue and epilogue, not the loop, decide its time. Class counts: tensor-core MMA · loads and stores "
        "(incl. cp.async, shared and constant memory) · integer and address arithmetic · everything else (moves, "
        "barriers, conversions, branches). The backward rows are the blocks' training path (dgrad and wgrad of "
        "conv3x3_pool and up_conv3x3; the first discriminator layer has no dgrad: its input is the image). "
        "'outside loop': instructions per warp before and after the main loop (prologue, epilogue; issued once "
        "per CTA, every branch counted). 'CTA load': the same ratio over a whole CTA, prologue and epilogue "
        "included (K-steps × the step's instructions + those outside the loop, over K-steps × tensor cycles): "
        "the tighter bound where a CTA runs few K-steps. 'useful-cycle load': the issue load against the tensor "
        "cycles the convolution needs, without the multiply-adds a kernel computes and throws away (the row-pair "
        "up-conv for Co ≤ 64 runs H + 1 row pairs for H input rows, the first and last half masked: issue load ÷ "
        "H/(H+1)); the same as the issue load elsewhere. "
        "The target (≤ 0.5) is judged on it, except where the K axis is too short for the tensor cores to bound "
        "the kernel (next paragraph).",
        "",
        "'epilogue floor': the issue load the epilogue alone costs against the tensor cycles of a CTA's whole K "
        f"(every output element needs ≥ {EPILOGUE_INSTRUCTIONS_PER_ELEMENT:g} instructions per thread: bias, the "
        "leaky ReLU as max(p, alpha·p), half a bf16 pack; a warp instruction covers 32 elements on one "
        f"of 4 schedulers): 16·{EPILOGUE_INSTRUCTIONS_PER_ELEMENT:g}/K, {16 * EPILOGUE_INSTRUCTIONS_PER_ELEMENT / 32:g} "
        "at K = 32. Above 0.5 no code can meet "
        "the tensor-core target, and the row is judged on its 'memory-time load' instead: a whole CTA's issue "
        "cycles per scheduler (every instruction of the kernel, prologue and epilogue included) ÷ the cycles its "
        "share of the layer's compulsory HBM traffic (output written once — pooled: value and int8 position —, "
        "input, weights and bias read once) takes at one SM's share of the H200's measured copy bandwidth, "
        f"{COPY_BYTES_PER_S / 1e12:g} TB/s / ({H200_SMS} SMs · {H200_SM_CLOCK_HZ / 1e9:g} GHz) = "
        f"{HBM_BYTES_PER_SM_CYCLE:.1f} B per cycle (ANCHORS.md). Below 1 issue keeps up with memory; it is a "
        "bound, not a time. Shown where it is the bound that applies (`static.json` has it for every implicit-GEMM "
        "conv3x3 and conv3x3_pool row; above 1 there it only says those layers are not memory-bound).",
        "",
        "| kernel | op | shape | config | instr/step/warp | tensor·mem·int·other | tensor cycles | warps/sched "
        "| issue load | useful-cycle load | ceiling | regs | spill B | smem KB | CTAs/SM | global B/step | K-steps/CTA "
        "| outside loop | CTA load | epilogue floor | memory-time load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
        "| --- | --- |",
    ]
    for r in rows:
        cfg = r.config + (" ★" if all_configs and r.preferred else "")
        if r.error:
            lines.append(f"| {r.kernel} | {r.op} | {r.shape} | {cfg} | error: {r.error.splitlines()[0][:120]} |" + " |" * 16)
            continue
        cls = "·".join(f"{r.by_class[k]:.0f}" for k in sass.CLASSES)
        branch = " (whole kernel)" if r.whole_kernel else " (branches)" if r.inner_branches else ""
        lines.append(
            f"| {r.kernel} | {r.op} | {r.shape} | {cfg} | {r.instructions_per_step:.0f}{branch} | {cls} "
            f"| {r.tensor_cycles_per_step:.0f} | {r.warps_per_scheduler} | {r.issue_load:.2f} | {r.useful_issue_load:.2f} "
            f"| {100 * r.ceiling:.0f} % "
            f"| {r.registers} | {r.spill_bytes} | {r.smem_bytes / 1024:.0f} | {r.ctas_per_sm} ({r.cta_limit}) "
            f"| {r.global_bytes_per_step / 1024:.0f} K | {r.k_steps or 'split-K'} | {r.outside_loop_instructions or '—'} "
            f"| {f'{r.cta_issue_load:.2f}' if r.cta_issue_load else '—'} "
            f"| {f'{r.epilogue_floor_load:.2f}' if r.epilogue_floor_load else '—'} "
            f"| {f'{r.memory_time_load:.2f}' if r.memory_bound else '—'} |"
        )
    return "\n".join(lines) + "\n"


def write(rows: list[Row], out_dir: Path, all_configs: bool) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "all-configs" if all_configs else "static"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(to_json(rows, all_configs), indent=1) + "\n")
    paths["md"].write_text(markdown(rows, all_configs))
    return paths


def load(path: Optional[Path] = None) -> dict[str, dict]:
    """The recorded rows of ``path`` (default: this triton's ``static.json``) by key."""
    path = path or default_out_dir() / "static.json"
    data = json.loads(path.read_text())
    return {f"{r['kernel']} {r['op']} {r['shape']} {r['config']}": r for r in data["rows"]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gankernels.bench static",
        description="Static issue-load bound of the Triton conv kernels from their sm_90 SASS (no GPU needed). " + BOUND_NOTE,
    )
    p.add_argument("--all-configs", action="store_true", help="every surviving autotune configuration, not only the first")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="rows whose 'kernel op shape config' contains one of these")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/static-<triton version>/)")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    p.add_argument("--jobs", type=int, default=1, help="compile processes (default 1)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018 - raises when Triton has no ptxas
    except Exception as e:  # noqa: BLE001
        raise SystemExit(f"this Triton cannot compile for sm_90 here ({type(e).__name__}: {e})") from None
    rows = measure(args.all_configs, args.jobs, args.only)
    print(markdown(rows, args.all_configs))
    if not args.no_write:
        paths = write(rows, args.out or default_out_dir(), args.all_configs)
        print(f"results: {paths['md']}, {paths['json']}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

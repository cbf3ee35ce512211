"""The command line of ``python -m gankernels.bench``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from gankernels.bench import cases as C
from gankernels.bench import report
from gankernels.bench.runner import GK_BACKENDS, run_cases
from gankernels.bench.selections import SELECTIONS
from gankernels.bench.timing import TimingConfig, measure_ceilings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gankernels.bench",
        description=(
            "Time stock PyTorch (eager NCHW and channels_last, torch.compile, the transposed-conv rewrite of the "
            "generator block) against every available gankernels backend, after checking each against the float64 "
            "reference; report medians, speed-ups and % of the roofline floor."
        ),
    )
    p.add_argument(
        "--select",
        choices=tuple(SELECTIONS),
        help="a named selection instead of --ops/--dtypes/--formats/--modes/--shapes: "
        + "; ".join(f"{k}: {v.description}" for k, v in SELECTIONS.items()),
    )
    p.add_argument(
        "--ops", nargs="+", choices=C.ALL_CHOICES, metavar="OP", help=f"cases to run (default: all): {' '.join(C.ALL_CHOICES)}"
    )
    p.add_argument("--dtypes", nargs="+", choices=tuple(C.DTYPES), help="default: bf16 fp32 on CUDA, fp32 on CPU")
    p.add_argument(
        "--formats",
        nargs="+",
        choices=tuple(C.FORMATS),
        help="memory format of the inputs of compile and gankernels (default: channels_last; stock eager always runs in both)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=C.MODES,
        help="fwd, fwdbwd (forward+backward), bwd (the backward alone) (default: fwd fwdbwd)",
    )
    p.add_argument(
        "--shapes", nargs="+", metavar="N,C,H,W[:Co]", help="custom shapes instead of the default ones, for every chosen op"
    )
    p.add_argument(
        "--backends", nargs="+", choices=GK_BACKENDS, help="gankernels backends to include (default: all; stock always runs)"
    )
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats, bf16 only on CUDA")
    p.add_argument(
        "--kernel-only",
        action="store_true",
        help="forward cases: also time each fast backend's kernel called directly, without dispatch and the custom op",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the torch.compile contenders (default: on CUDA yes; on CPU no — compiling every case takes many minutes "
        "on a small CPU; skipped ones are listed as n/a)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        help="after this many seconds, skip torch.compile for the remaining cases (listed as n/a) so the run ends in time",
    )
    p.add_argument(
        "--stop-s",
        type=float,
        help="after this many seconds, run no further case (they are listed with every contender n/a) nor the training step",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<gpu-or-cpu>-<date>/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: torch threads (default 1, for stable medians on a shared machine; 0 = torch's default)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["host-cost"]:  # the eager path's host cost: its own command line
        from gankernels.bench import host_cost

        return host_cost.main(argv[1:])
    if argv[:1] == ["static-cuda"]:  # the CUDA extension's kernels: registers, spills, divisions in loops
        from gankernels.bench import static_cuda

        return static_cuda.main(argv[1:])
    if argv[:1] == ["static"]:
        # `python -m gankernels.bench static [--help]`: the static bound from sm_90 SASS, no GPU.
        from gankernels.bench import static_report

        return static_report.main(argv[1:])
    args = build_parser().parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here")
    gpu = device == "cuda"
    if not gpu and args.threads:
        # One thread by default: on a shared CPU, OpenMP workers waiting for a busy core
        # turn millisecond ops into outliers of tens of ms.
        torch.set_num_threads(args.threads)
    selection = SELECTIONS[args.select] if args.select else None
    backends = args.backends
    kernel_only = args.kernel_only
    if selection is not None:
        given = [f"--{k}" for k in ("ops", "dtypes", "formats", "modes", "shapes") if getattr(args, k)]
        if given:
            raise SystemExit(f"--select {args.select}: chooses the cases itself; drop {' '.join(given)} (or drop --select)")
        cases = selection.cases(device, args.quick)
        ops = sorted({c.op for c in cases}) + (["train_step"] if selection.train_step else [])
        dtypes, formats, modes = (sorted({getattr(c, k) for c in cases}) for k in ("dtype", "fmt", "mode"))
        backends = backends if backends is not None else (list(selection.backends) if selection.backends else None)
        kernel_only = kernel_only or selection.kernel_only
    else:
        ops = args.ops or list(C.ALL_CHOICES)
        if args.dtypes:
            dtypes = args.dtypes
        elif gpu:
            dtypes = ["bf16"] if args.quick else ["bf16", "fp32"]
        else:
            dtypes = ["fp32"]
        formats = args.formats or ["channels_last"]
        modes = args.modes or list(C.DEFAULT_MODES)
        try:
            shapes = [C.parse_shape(s) for s in args.shapes] if args.shapes else None
            cases = C.build_cases(ops, dtypes, formats, modes, device, args.quick, shapes)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    compile = args.compile if args.compile is not None else gpu
    compile_skip = (
        "torch.compile not run (--no-compile)"
        if args.compile is False
        else "torch.compile skipped on CPU by default (pass --compile)"
    )
    timing = TimingConfig.for_run(args.quick)
    env = report.environment(device, sys.argv[1:] if argv is None else argv)
    out_dir = args.out or report.default_out_dir(env)
    t0 = time.perf_counter()

    print(
        f"gankernels.bench on {env['gpu'] or 'CPU'}: {len(cases)} cases" + (" + the training step" if "train_step" in ops else ""),
        file=sys.stderr,
    )
    ceilings = measure_ceilings(device, timing)
    print(
        f"ceilings: copy {ceilings.copy_bytes_per_s / 1e9:.1f} GB/s ({ceilings.copy_what}), "
        f"matmul {ceilings.matmul_flops_per_s / 1e12:.2f} TFLOP/s ({ceilings.matmul_what})",
        file=sys.stderr,
    )
    summaries = run_cases(
        cases,
        device,
        timing,
        ceilings,
        compile=compile,
        compile_skip=compile_skip,
        backends=backends,
        seed=args.seed,
        show_progress=not args.no_progress,
        budget_s=args.budget_s,
        stop_s=args.stop_s,
        kernel_only=kernel_only,
    )
    train = None
    if "train_step" in ops and args.stop_s is not None and time.perf_counter() - t0 > args.stop_s:
        print(f"training step not run: past --stop-s {args.stop_s:g}", file=sys.stderr)
    elif "train_step" in ops:
        from gankernels.bench.training_step import TrainConfig, run_training_step

        print("training step ...", file=sys.stderr)
        train_compile = compile and (args.budget_s is None or time.perf_counter() - t0 < args.budget_s)
        train = run_training_step(
            device,
            TrainConfig.for_device(device, args.quick),
            timing,
            compile=train_compile,
            compile_skip=compile_skip if not compile else f"skipped: the run passed its time budget (--budget-s {args.budget_s})",
            gankernels=backends is None or len(backends) > 0,
            seed=args.seed,
        )
    options = {
        "select": args.select, "ops": ops, "dtypes": dtypes, "formats": formats, "modes": modes, "shapes": args.shapes,
        "backends": backends, "kernel_only": kernel_only, "quick": args.quick, "compile": compile, "seed": args.seed,
        "timing": dict(timing.__dict__),
        "wall_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    results = report.assemble(env, ceilings, summaries, train, options)
    paths = report.write_all(results, out_dir, plots=not args.no_plots)
    print(report.header(results))
    print()
    print(report.markdown_table(results))
    print()
    extra = report.extra_tables(results)
    if extra:
        print(extra)
        print()
    print(f"results: {', '.join(str(p) for p in paths.values())} ({options['wall_s']} s)")
    if not gpu:
        print(report.CPU_NOTE)
    return 0

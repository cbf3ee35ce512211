"""The summary ``scripts/gpu_check.sh`` prints last, from the folder it wrote.

    python -m gankernels.bench.summary DIR

``DIR`` holds ``stages.tsv`` (one line per stage: name, status, seconds, log) and one
results folder per benchmark selection (``DIR/<selection>/results.json``). Printed, in
this order: one line per selection run, the ANCHORS targets reached across all of them
(:mod:`gankernels.bench.targets`), the GPU tests' closing line, and the stage table
last — with the command that runs the stages that did not fit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from gankernels.bench import bound_vs_time, static_report
from gankernels.bench.report import fmt_ms, load_results
from gankernels.bench.targets import COPY_BANDWIDTH, MET, TRAIN_MEMORY, verdicts

STAGES_FILE = "stages.tsv"


def read_stages(folder: Path) -> list[dict]:
    """The driver's stage log: ``name<TAB>status<TAB>seconds<TAB>log`` per line."""
    path = folder / STAGES_FILE
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            out.append({"name": parts[0], "status": parts[1], "seconds": parts[2], "log": parts[3] if len(parts) > 3 else ""})
    return out


def _reached(v) -> str:
    if v.value is None:
        return "—"
    if v.target.kind == COPY_BANDWIDTH:
        return f"{v.value:.0f} %"
    if v.target.kind == TRAIN_MEMORY:
        return f"{v.value:.2f}"
    return f"{v.value:.2f}×"


def _tests_line(folder: Path, stages: list[dict]) -> Optional[str]:
    for s in stages:
        if s["name"] == "tests" and s["log"]:
            log = folder / s["log"]
            if log.is_file():
                lines = [
                    ln
                    for ln in log.read_text(errors="replace").splitlines()
                    if any(w in ln for w in ("passed", "failed", "error", "skipped", "deselected"))
                ]
                return lines[-1].strip("= ") if lines else None
    return None


def _bound_tables(loaded: list[tuple[Path, dict]]) -> list[str]:
    """The static bound beside each run's Triton kernel times (:mod:`gankernels.bench.bound_vs_time`),
    for the runs (folder, results) that timed a forward row the report has."""
    out: list[str] = []
    for run, results in loaded:
        try:
            static_path = bound_vs_time.static_path_for(results)
            found = bound_vs_time.rows(results, static_report.load(static_path))
        except (OSError, ValueError, KeyError):
            continue  # no recorded report for this triton, or no results: nothing to set beside
        if found:
            out += ["", f"{run.name}: " + bound_vs_time.markdown(found, results, str(static_path)).rstrip()]
    return out


def render(folder: Path) -> str:
    stages = read_stages(folder)
    lines: list[str] = [f"== summary of {folder}"]
    runs = sorted(p.parent for p in folder.glob("*/results.json"))
    all_verdicts = []
    loaded: list[tuple[Path, dict]] = []
    for run in runs:
        try:
            results = load_results(run)
        except (OSError, ValueError) as e:
            lines.append(f"- {run.name}: unreadable results ({e})")
            continue
        loaded.append((run, results))
        env = results["env"]
        cases = results["cases"]
        ok = sum(1 for c in cases if c["best_gankernels"])
        speedups = [c["speedup"] for c in cases if c["speedup"]]
        best = f", speed-ups {min(speedups):.2f}×–{max(speedups):.2f}×" if speedups else ""
        train = " + the training step" if results.get("train_step") else ""
        lines.append(
            f"- {run.name}: {len(cases)} cases{train} on {env['gpu'] or 'CPU'} (torch {env['torch']}, triton {env['triton']}), "
            f"{ok} with a gankernels time{best}, {results['options'].get('wall_s', '?')} s; {run / 'results.md'}"
        )
        all_verdicts += [(run.name, v) for v in verdicts(results)]
    if all_verdicts:
        counts: dict[str, int] = {}
        for _, v in all_verdicts:
            counts[v.status] = counts.get(v.status, 0) + 1
        lines += ["", "ANCHORS targets: " + ", ".join(f"{n} {s}" for s, n in counts.items()), ""]
        lines.append("| selection | case | target | reached | verdict |")
        lines.append("| --- | --- | --- | ---: | --- |")
        for name, v in all_verdicts:
            verdict = v.status if v.status == MET else f"{v.status}" + (f": {v.note}" if v.note else "")
            vs = f" vs {v.against} {fmt_ms(v.against_ms)} ms" if v.against else ""
            gk = f"{v.gankernels} {fmt_ms(v.gankernels_ms)} ms{vs}" if v.gankernels_ms else ""
            lines.append(f"| {name} | {v.case} | {v.target.describe()} | {_reached(v)} {gk} | {verdict} |")
    lines += _bound_tables(loaded)
    host = folder / "host" / "host_cost.md"
    if host.exists():  # the host-cost stage: its table as written
        lines += ["", *host.read_text().strip().splitlines()[2:]]
    tests = _tests_line(folder, stages)
    if tests:
        lines += ["", f"GPU tests: {tests}"]
    if stages:
        lines += ["", "| stage | status | s | log |", "| --- | --- | ---: | --- |"]
        lines += [f"| {s['name']} | {s['status']} | {s['seconds']} | {s['log']} |" for s in stages]
        left = [s["name"] for s in stages if s["status"].startswith("skipped")]
        if left:
            lines += ["", f"Not run for lack of time; next call: bash scripts/gpu_check.sh build {' '.join(left)}"]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m gankernels.bench.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="the folder scripts/gpu_check.sh wrote (its OUT)")
    args = p.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"folder: {args.folder} is not a folder written by scripts/gpu_check.sh")
    print(render(args.folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())

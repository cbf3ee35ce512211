"""PNG plots of a results dict (matplotlib, Agg backend: no display needed).

* ``speedup.png`` — per case, the best gankernels time's speed-up over the best stock
  contender (1× marked);
* ``roofline.png`` — per case, the best stock and best gankernels time as % of the
  roofline floor (100 % = at the floor).
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write the plots; returns their paths (none when there are no cases)."""
    cases = results["cases"]
    if not cases:
        return {}
    plt = _pyplot()
    labels = [c["id"] for c in cases]
    height = max(3.0, 0.28 * len(cases) + 1.5)
    dev = results["env"]["gpu"] or "CPU"
    paths = {}

    fig, ax = plt.subplots(figsize=(10, height))
    vals = [c["speedup"] or 0.0 for c in cases]
    colors = ["tab:green" if v >= 1 else "tab:red" for v in vals]
    ax.barh(range(len(cases)), vals, color=colors)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(cases)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the best gankernels contender over the best stock one (×; 0 = none ran)")
    ax.set_title(f"gankernels vs stock PyTorch — {dev}")
    fig.tight_layout()
    paths["speedup_png"] = out_dir / "speedup.png"
    fig.savefig(paths["speedup_png"], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, height))
    ys = range(len(cases))
    stock = [c["pct_floor_best_stock"] or 0.0 for c in cases]
    gk = [c["pct_floor_best_gankernels"] or 0.0 for c in cases]
    ax.barh([y - 0.2 for y in ys], stock, height=0.4, label="best stock", color="tab:gray")
    ax.barh([y + 0.2 for y in ys], gk, height=0.4, label="best gankernels", color="tab:blue")
    ax.axvline(100.0, color="black", lw=0.8)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% of the roofline floor (floor = max(FLOPs / matmul rate, bytes / copy bandwidth))")
    ax.set_title(f"achieved vs roofline — {dev}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths["roofline_png"] = out_dir / "roofline.png"
    fig.savefig(paths["roofline_png"], dpi=110)
    plt.close(fig)
    return paths

"""The search-trace plot: every trial's objective, the best so far, and the table's baselines."""

from __future__ import annotations

from pathlib import Path

from meteor.io import atomic_path
from meteor.merging.search import SearchResult

_COLORS = {"zeros": "black", "uniform": "tab:green", "sum": "tab:purple",
           "search": "tab:blue", "posterior_mean": "tab:red"}


def plot_trace(result: SearchResult, table: dict[str, dict], path: str | Path,
               objective_name: str) -> None:
    """Write a PNG of the search trace (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sign = 1.0 if result.direction == "minimize" else -1.0
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    best_so_far, best = [], None
    for r in result.records:
        best = r.objective if best is None else min(best, r.objective, key=lambda v: sign * v)
        best_so_far.append(best)
    xs = [r.number for r in result.records]
    for role_prefix in ("zeros", "one_hot", "uniform", "sum", "search", "posterior_mean"):
        pts = [(r.number, r.objective) for r in result.records if r.role.startswith(role_prefix)]
        if pts:
            ax.scatter(*zip(*pts), s=22, label=role_prefix.replace("_", " "), zorder=3,
                       color=_COLORS.get(role_prefix, "tab:orange"))
    ax.step(xs, best_so_far, where="post", color="gray", label="best so far")
    if table.get("train_all", {}).get("objective") is not None:
        ax.axhline(table["train_all"]["objective"], ls="--", color="tab:brown", label="train@all")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"dev {objective_name} ({result.direction})")
    ax.set_title("merge weight search")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        # No timestamp in the metadata: the same trials give the same bytes.
        fig.savefig(tmp, format="png", metadata={"Software": None})
    plt.close(fig)

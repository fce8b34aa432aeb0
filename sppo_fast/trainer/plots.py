"""PNG plots of one or more runs, overlaid: held-out accuracy and training reward, against the RL step
and against wall-clock seconds; and, for a comparison, the clip fraction and policy entropy per step of
each algorithm (`plot_training_signals`)."""

from __future__ import annotations

import json
import os


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"run directory {run_dir!r} has no metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_label(run_dir: str) -> str:
    path = os.path.join(run_dir, "config.json")
    name = os.path.basename(os.path.normpath(run_dir))
    if os.path.exists(path):
        with open(path) as f:
            algo = json.load(f).get("algo")
        if algo and algo not in name:
            name = f"{algo} ({name})"
    return name


def _series(rows, key, x):
    pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _same(gx, gy, xs, ys) -> bool:
    """Greedy points identical to the plotted evaluation (a greedy run): draw them once."""
    lookup = dict(zip(xs, ys))
    return all(lookup.get(x) == y for x, y in zip(gx, gy))


def plot_runs(run_dirs: list[str], out_dir: str) -> list[str]:
    """Write accuracy.png (held-out accuracy) and reward.png (training reward), each with a panel against
    step and one against wall-clock, every run overlaid. Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_label(r), read_metrics(r)) for r in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, title, fname in (("eval_accuracy", "held-out accuracy", "accuracy.png"),
                              ("reward", "training reward (mean)", "reward.png")):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, (label, rows) in enumerate(runs):
            color = f"C{i % 10}"
            for ax, x in zip(axes, ("step", "wall")):
                xs, ys = _series(rows, key, x)
                if xs:
                    ax.plot(xs, ys, marker="o" if key == "eval_accuracy" else None, markersize=3, color=color,
                            label=label + (" (sampled)" if key == "eval_accuracy" else ""))
                gx, gy = _series(rows, "eval_accuracy_greedy", x)
                if key == "eval_accuracy" and gx and not _same(gx, gy, xs, ys):
                    ax.plot(gx, gy, linestyle="--", marker="s", markersize=4, color=color,
                            label=label + " (greedy)")
        axes[0].set_xlabel("RL step")
        axes[1].set_xlabel("wall-clock seconds (warm start included)")
        for ax in axes:
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def log_scale_threshold(values: list[float], span: float = 100.0) -> float | None:
    """Where a symlog axis should turn linear when the positive `values` span more than `span`x (their
    smallest positive value, at least 1e-6), else None: a linear axis then does."""
    positive = [v for v in values if v > 0]
    if not positive or max(positive) / min(positive) <= span:
        return None
    return max(min(positive), 1e-6)


def plot_training_signals(records: list[dict], path: str, keys=("clipfrac", "entropy"), algos=None) -> str:
    """One panel per key of the per-step traces that `sppo-fast compare` keeps (compare.json's
    runs[i]["trace"]; by default the clip fraction and the policy entropy in nats per token) against the RL
    step: each run thin, each algorithm's mean over its runs thick. Steps without the key (critic warm-up)
    are gaps. `algos` fixes the order and colours (default: as the records come)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in records if r.get("status") == "ok" and r.get("trace")]
    order = list(algos) if algos else list(dict.fromkeys(r["algo"] for r in runs))
    titles = {"clipfrac": "clip fraction (tokens whose ratio was clipped)", "entropy": "policy entropy (nats/token)"}
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        means = []
        for i, algo in enumerate(order):
            traces = [r["trace"] for r in runs if r["algo"] == algo and r["trace"].get(key)]
            if not traces:
                continue
            color = f"C{i % 10}"
            by_step: dict[int, list[float]] = {}
            for trace in traces:
                pts = [(s, v) for s, v in zip(trace["step"], trace[key]) if v is not None]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.25, linewidth=0.8)
                for s, v in pts:
                    by_step.setdefault(s, []).append(v)
            steps = sorted(by_step)
            mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            means += mean
            ax.plot(steps, mean, color=color, linewidth=2, label=f"{algo} ({len(traces)} runs)")
        ax.set_xlabel("RL step")
        ax.set_ylabel(titles.get(key, key))
        threshold = log_scale_threshold(means)
        if threshold is not None:  # e.g. GSPO clipping 10% of tokens beside GRPO's 0.04%: a linear axis hides GRPO
            ax.set_yscale("symlog", linthresh=threshold)
            ax.set_ylabel(titles.get(key, key).split(" (")[0] + " (symlog axis)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""The training-curve figure written at the end of a run: the loss per logged step, eval RSUM and R@1."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_training_curves(log_history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Plot training loss and, if present, the eval RSUM / R@1 against the step.

    Args:
        log_history: `TrainerState.log_history` entries (``step`` plus ``loss`` or ``eval_*`` keys).
        path: PNG to write.
        title: Figure title.

    Returns:
        The written path, or ``None`` when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [e for e in log_history if "eval_rsum" in e]
    if not train and not evals:
        return None
    n_panels = 2 if evals else 1
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 3.6), squeeze=False)
    ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        window = max(1, len(losses) // 25)  # a moving average shows the trend under the batch noise
        if window == 1:
            ax.plot(steps, losses, lw=1.6, color="tab:blue", label="per logged step")
        else:
            ax.plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.35, label="per logged step")
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                      for i in range(len(losses))]  # fmt: skip
            ax.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"mean of {window} logged steps")
        ax.set_yscale("log")  # contrastive losses fall by orders of magnitude; a linear axis hides the tail
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)")
    ax.grid(alpha=0.3, which="both")
    if evals:
        ax = axes[0][1]
        steps = [e["step"] for e in evals]
        ax.plot(steps, [e["eval_rsum"] for e in evals], marker="o", color="tab:green", label="RSUM")
        ax.set_xlabel("step")
        ax.set_ylabel("validation RSUM")
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        for key, colour in (("eval_i2t_r1", "tab:orange"), ("eval_t2i_r1", "tab:red")):
            twin.plot(
                steps,
                [e.get(key, float("nan")) for e in evals],
                ls="--",
                marker=".",
                color=colour,
                label=key[5:],
            )
        twin.set_ylabel("R@1 (%)")
        twin.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""What a run reports: a live progress bar, metrics.jsonl, TensorBoard and a loss plot.

Only rank 0 reports. On a terminal the bar shows step, loss, learning rate,
tokens/s and ETA; in a log file (not a TTY) the same fields are printed as a
line every `log_every` steps.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from shipyard.fsutil import write_text_atomic


class MetricsLogger:
    def __init__(self, out_dir: Path, total_steps: int, start_step: int, log_every: int, enabled: bool = True):
        self.enabled = enabled
        self.out_dir = out_dir
        self.total_steps, self.log_every = total_steps, log_every
        self.tty = sys.stderr.isatty()
        self._bar = None
        self._tb = None
        self._jsonl = None
        self._started = time.perf_counter()
        self._start_step = start_step
        self._window_start, self._window_tokens = self._started, 0
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = (out_dir / "metrics.jsonl").open("a")
        from torch.utils.tensorboard import SummaryWriter  # slow import; only rank 0 pays it

        self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
        if self.tty:
            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict) -> None:
        """Record one step's metrics (`step` is 1-based: the number of optimizer steps done)."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        # What people read is throughput averaged since the last display, not one step's.
        self._window_tokens += metrics.get("train/tokens", 0)
        show = self._bar is not None or step % self.log_every == 0 or step == self.total_steps
        if not show:
            return
        now = time.perf_counter()
        shown = dict(metrics)
        if now > self._window_start and self._window_tokens:
            shown["train/tokens_per_second"] = self._window_tokens / (now - self._window_start)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(shown), refresh=False)
            self._bar.update(step - self._bar.n)
        else:
            print(f"step {step}/{self.total_steps}  {self._postfix(shown)}  eta {self._eta(step)}", flush=True)
        if self._bar is None or now - self._window_start > 5.0:
            self._window_start, self._window_tokens = now, 0

    def _postfix(self, m: dict) -> str:
        parts = []
        if "train/loss" in m:
            parts.append(f"loss {m['train/loss']:.4f}")
        if "train/loss_main" in m:  # MTP runs: the base's loss and each depth's
            depths = [m[k] for k in sorted(m) if k.startswith("train/loss_mtp_")]
            parts.append(f"(main {m['train/loss_main']:.4f}, mtp {' '.join(f'{d:.4f}' for d in depths)})")
        if "train/lr" in m:
            parts.append(f"lr {m['train/lr']:.2e}")
        if "train/tokens_per_second" in m:
            parts.append(f"{m['train/tokens_per_second']:,.0f} tok/s")
        if "eval/loss" in m:
            parts.append(f"eval {m['eval/loss']:.4f}")
        if "eval/mtp_acceptance_1" in m:
            parts.append(f"mtp accept {m['eval/mtp_acceptance_1']:.3f}")
        return "  ".join(parts)

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if done <= 0:
            return "?"
        remaining = (time.perf_counter() - self._started) / done * (self.total_steps - step)
        return time.strftime("%H:%M:%S", time.gmtime(remaining))

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        (tqdm.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_totals(path: Path) -> tuple[float | None, int, float]:
    """(final train loss, tokens, training seconds) over every step on record, resumed parts included."""
    rows = read_metrics(path)
    tokens = sum(r["train/tokens"] for r in rows)
    seconds = sum(r["train/tokens"] / r["train/tokens_per_second"] for r in rows if r["train/tokens_per_second"])
    return (rows[-1]["train/loss"] if rows else None), tokens, seconds


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    """Training loss per step (raw and smoothed), validation loss points, and the lr on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    evals = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
    lrs = [(r["step"], r["train/lr"]) for r in rows if "train/lr" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    steps, losses = zip(*train)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
    smooth, ema = [], losses[0]
    for value in losses:
        ema = 0.9 * ema + 0.1 * value
        smooth.append(ema)
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label="train loss (EMA 0.9)")
    if evals:
        ax.plot(*zip(*evals), "o-", color="tab:orange", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:gray", linestyle="--", linewidth=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        ax2.legend(loc="upper center")
    ax.legend(loc="upper right")
    ax.set_title(f"{metrics_path.parent.name}: training loss")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)


def truncate_metrics(path: Path, keep_through_step: int) -> None:
    """Drop records past the step a run resumes from (a crash can leave steps after the last checkpoint)."""
    if not path.is_file():
        return
    rows = [r for r in read_metrics(path) if r["step"] <= keep_through_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))  # a kill here keeps the old history

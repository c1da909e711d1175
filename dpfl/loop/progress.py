"""The progress bar over rounds (rich), showing the metric and epsilon so far."""

from __future__ import annotations

from typing import Any


class Progress:
    """A rich progress bar over rounds (or nothing when disabled)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(
                TextColumn("rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.task = self.bar.add_task("rounds", total=total, completed=done, info="")
            self.bar.start()

    def update(self, metrics: dict[str, Any], metric: str) -> None:
        if self.bar is None:
            return
        parts = []
        if f"eval_{metric}" in metrics:
            parts.append(f"{metric} {metrics[f'eval_{metric}']:.4f}")
        eps = [k for k in metrics if k.startswith("epsilon_")]
        if eps:  # the configured accountant's when it was computed, else RDP's
            parts.append(f"eps {metrics[eps[-1]]:.3g}")
        self.bar.update(self.task, advance=1, info="  ".join(parts))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()

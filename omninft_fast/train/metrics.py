"""Metrics sinks (JSONL, TensorBoard, wandb), and progress bars."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``path``. A torn last line (a kill during its write) is dropped with a warning on stderr;
    a bad line elsewhere raises ``ValueError`` naming the file and line."""
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise ValueError(f"{path}:{number} is not a JSON line") from None
            print(f"warning: dropped the torn last line {number} of {path}", file=sys.stderr)
    return records


class MetricsLogger:
    """Appends one JSON line per iteration to ``metrics.jsonl``; mirrors scalars to TensorBoard and wandb.

    Args:
        output_dir: run directory.
        tensorboard: write TensorBoard events under ``output_dir/tensorboard`` when TensorBoard is installed.
        wandb: log to wandb when installed.
        config: run configuration (for wandb).
        resume_iteration: on resume, drop JSONL lines of iterations after this one (a killed run's partial tail).
    """

    def __init__(
        self,
        output_dir: str | Path,
        *,
        tensorboard: bool = True,
        wandb: bool = False,
        config: dict[str, Any] | None = None,
        resume_iteration: int | None = None,
    ) -> None:
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_iteration is None:
            self.path.write_text("")
        elif self.path.exists():
            records = _read_records(self.path)
            kept = [json.dumps(record) for record in records if record["iteration"] <= resume_iteration]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: TensorBoard is not installed; metrics go to metrics.jsonl only")
            else:
                self._tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        self._wandb = None
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                print("note: wandb is not installed; skipping it")
            else:
                self._wandb = wandb_module.init(project="omninft-fast", config=config, dir=str(output_dir))

    def log(self, iteration: int, metrics: dict[str, float]) -> None:
        record = {"iteration": iteration, **metrics}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, iteration)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=iteration)

    def history(self) -> list[dict[str, float]]:
        return _read_records(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def progress_bar(total: int, desc: str, *, enabled: bool) -> tqdm:
    """A transient tqdm bar (cleared when closed); silent when not ``enabled``."""
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)

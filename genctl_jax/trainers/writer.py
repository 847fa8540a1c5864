"""Metrics out: console lines and a progress bar, TensorBoard events, metrics.jsonl.

Only process 0 writes files; every process may log to its console.
"""

from __future__ import annotations

import datetime
import json
import pathlib
import time

import jax
import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:
    """Writes scalars and images; keeps throughput and ETA between log calls."""

    def __init__(self, workdir, *, total_steps: int, start_step: int, progress_bar: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.total_steps = total_steps
        self.is_main = jax.process_index() == 0
        self._tb = SummaryWriter(str(self.workdir / "tb")) if self.is_main else None
        self._jsonl = open(self.workdir / "metrics.jsonl", "a") if self.is_main else None  # noqa: SIM115
        self._bar = (
            tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
            if self.is_main and progress_bar
            else None
        )
        self._last_time, self._last_step = time.perf_counter(), start_step

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def throughput(self, step: int, batch_size: int) -> dict[str, float]:
        """steps/s, examples/s and ETA (seconds) since the previous call."""
        now = time.perf_counter()
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_time, self._last_step = now, step
        return {
            "steps_per_s": steps_per_s,
            "examples_per_s": steps_per_s * batch_size,
            "eta_s": (self.total_steps - step) / max(steps_per_s, 1e-9),
        }

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        scalars = {k: float(v) for k, v in scalars.items()}
        text = " | ".join(
            f"eta {datetime.timedelta(seconds=round(v))}" if k == "eta_s" else f"{k} {v:.4g}"
            for k, v in scalars.items()
        )
        message = f"step {step}/{self.total_steps} | {text}"
        if self._bar is not None:
            self._bar.write(message)
        logging.info(message)
        if not self.is_main:
            return
        for key, value in scalars.items():
            self._tb.add_scalar(key, value, step)
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        self._tb.flush()

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """One HWC uint8 image (a sample grid) to TensorBoard."""
        if self.is_main:
            self._tb.add_image(name, image, step, dataformats="HWC")
            self._tb.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self.is_main:
            self._tb.close()
            self._jsonl.close()

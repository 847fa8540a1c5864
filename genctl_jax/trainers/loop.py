"""`train_and_evaluate(config, workdir)`: the one training loop every family runs."""

from __future__ import annotations

import json
import pathlib
import queue
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from genctl_jax import configlib, trainers
from genctl_jax.data import pipeline
from genctl_jax.errors import CheckpointError, ConfigError, TrainingError
from genctl_jax.io import images
from genctl_jax.io.checkpoints import CORRUPT_DIR, Checkpointer
from genctl_jax.parallel import distributed
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import state as state_lib
from genctl_jax.trainers import trainer as trainer_lib
from genctl_jax.trainers import writer
from genctl_jax.trainers.saved_run import BEST_CHECKPOINT_DIR

# Fields a resumed run may change without becoming "another config's run".
RESUMABLE_FIELDS = (
    "overwrite",
    "mesh.",
    "trainer.num_train_steps",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.async_checkpoints",
    "trainer.sample_every",
    "eval.",
    "trainer.num_samples",
    "trainer.progress_bar",
    "trainer.max_nonfinite_steps",
    "data.data_dir",
    "data.prefetch",
    "data.worker_threads",
)
RUN_OUTPUTS = (
    "checkpoints",
    CORRUPT_DIR,
    BEST_CHECKPOINT_DIR,
    "eval",
    "tb",
    "samples",
    "metrics.jsonl",
    "config.json",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def claim_workdir(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Refuses a workdir holding a run of another config, unless config.overwrite is set."""
    saved_file = workdir / "config.json"
    current = json.loads(config.to_json_best_effort())
    if saved_file.exists():
        saved = json.loads(saved_file.read_text())
        a, b = _flatten(saved), _flatten(current)
        changed = sorted(
            k
            for k in set(a) | set(b)
            if a.get(k) != b.get(k) and not k.startswith(RESUMABLE_FIELDS)
        )
        if changed and not config.overwrite:
            details = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed[:5])
            raise CheckpointError(
                f"workdir {workdir} holds a run of another config ({details}"
                f"{'; ...' if len(changed) > 5 else ''}). Use another --workdir, or pass "
                f"--config.overwrite=True to delete that run and start afresh"
            )
        if changed and jax.process_index() == 0:
            logging.warning("config.overwrite=True: deleting the previous run in %s", workdir)
            for name in RUN_OUTPUTS:
                path = workdir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        saved_file.write_text(json.dumps(current, indent=2, sort_keys=True))


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> state_lib.TrainState:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the state."""
    if "://" in str(workdir):
        raise CheckpointError(
            f"workdir {workdir!r} is a URL; remote storage is not supported yet. Mount the "
            f"bucket (e.g. gcsfuse, or the GKE GCS FUSE CSI driver) and pass the mount path"
        )
    workdir = pathlib.Path(workdir)
    devices = list(jax.devices() if devices is None else devices)

    # ---- Validate the config and claim the workdir, before compiling anything.
    if jax.process_count() > 1:
        # The embedded dataset is built on first use: one process builds, the others wait.
        if jax.process_index() == 0:
            pipeline.validate(config.data, process_count=jax.process_count())
        distributed.barrier("genctl_jax: data prepared")
    configlib.validate(config, num_devices=len(devices))
    claim_workdir(config, workdir)
    distributed.barrier("genctl_jax: workdir claimed")

    # ---- Mesh.
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    logging.info("Mesh %s over %d devices", dict(mesh.shape), mesh.size)

    # ---- Input: each process reads its slice of every global batch.
    data = pipeline.create_iterator(config.data, seed=config.seed)
    data_start = data.get_state()
    total_steps = config.trainer.num_train_steps
    if config.data.num_epochs and config.data.num_epochs * data.steps_per_epoch < total_steps:
        raise ConfigError(
            f"config.data.num_epochs={config.data.num_epochs} gives "
            f"{config.data.num_epochs * data.steps_per_epoch} batches of {data.global_batch_size}, "
            f"fewer than config.trainer.num_train_steps={total_steps}; raise num_epochs, lower "
            f"num_train_steps, or set num_epochs=None to read forever"
        )

    # ---- Model, optimizers, sharded state layout, jitted update and sampler.
    # The run's first global batch: the shapes to compile for, and the fixed input of every
    # sample grid, the same before and after a resume.
    task = trainers.build_task(config)
    example = pipeline.to_global(task.prepare_batch(next(data)), mesh)
    run = trainer_lib.build(config, mesh, example, task)

    # ---- Checkpoint: resume when the workdir has one, else initialise.
    checkpointer = Checkpointer(
        workdir / "checkpoints",
        max_to_keep=config.trainer.keep_checkpoints,
        async_save=config.trainer.async_checkpoints,
    )
    restored = checkpointer.restore(run.layout.abstract)
    if jax.process_count() > 1:
        # Processes can finish compiling minutes apart (on CPU only process 0 gets cache hits:
        # it alone writes the cache, and the key holds the device assignment), and gloo gives
        # up on a collective that a process joins 30 s late: compile first, then start together.
        run.compile(example, init=restored is None)
        distributed.barrier("genctl_jax: compiled")
    if restored is None:
        state = run.initialize()
        data.set_state(data_start)
        logging.info("Initialised a new run in %s", workdir)
    else:
        state, data_state, saved_step = restored
        data.set_state(data_state)
        logging.info("Resumed from the checkpoint at step %d", saved_step)
    start_step = int(state.step)

    metrics_out = writer.MetricWriter(
        workdir,
        total_steps=total_steps,
        start_step=start_step,
        progress_bar=config.trainer.progress_bar,
    )

    def write_samples(step_number: int) -> None:
        params = {**state.params, **state.ema_params}
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 2**31 - 1)
        samples = run.sample(params, key, example)
        if samples is None:
            return
        grid = images.make_grid(images.to_uint8(jax.device_get(samples)))
        if jax.process_index() == 0:
            images.save_png(workdir / "samples" / f"step_{step_number:08d}.png", grid)
        metrics_out.write_image(step_number, "samples", grid)

    evaluate = None
    if config.eval.every_steps:
        from genctl_jax.trainers.periodic_eval import PeriodicEvaluation

        evaluate = PeriodicEvaluation(config, workdir, mesh, task)

    # ---- Loop. Metrics of step k are read while step k+1 runs; batches are read, prepared
    # and placed on a thread, while the step runs.
    t = config.trainer
    pending, history = None, []
    batches = BatchPrefetcher(data, lambda b: pipeline.to_global(task.prepare_batch(b), mesh))
    try:
        for step_number in range(start_step + 1, total_steps + 1):
            batch, data_state = next(batches)
            state, metrics = run.train_step(state, batch)
            if pending is not None:
                history.append(_check_finite(*pending, t.max_nonfinite_steps))
            pending = (step_number, metrics)
            metrics_out.advance()

            if step_number % t.log_every == 0 or step_number == total_steps:
                history.append(_check_finite(*pending, t.max_nonfinite_steps))
                pending = None
                scalars = {k: np.mean([h[k] for h in history]) for k in history[0]}
                scalars.pop("nonfinite_streak")
                scalars["update_skipped"] = sum(h["update_skipped"] for h in history)
                scalars.update(metrics_out.throughput(step_number, config.data.batch_size))
                metrics_out.write_scalars(step_number, scalars)
                history = []
            if t.checkpoint_every and (
                step_number % t.checkpoint_every == 0 or step_number == total_steps
            ):
                checkpointer.save(step_number, state, data_state)
            if t.sample_every and (step_number % t.sample_every == 0 or step_number == total_steps):
                write_samples(step_number)
            every = config.eval.every_steps
            if evaluate and (step_number % every == 0 or step_number == total_steps):
                scores = evaluate(step_number, state, data_state)
                metrics_out.write_scalars(step_number, {f"eval/{k}": v for k, v in scores.items()})
        if pending is not None:
            _check_finite(*pending, t.max_nonfinite_steps)
    finally:
        batches.close()
        checkpointer.close()
        if evaluate:
            evaluate.close()
        metrics_out.close()
        data.close()
    return state


class BatchPrefetcher:
    """Iterates (prepare(next(data)), data.get_state() after that batch) from a thread.

    A jitted step holds the calling thread until it finishes on the CPU backend, so the host
    work of the next batch (reading, tokenising, placing on devices) would otherwise add to
    every step. Each batch travels with the iterator state just after it: a checkpoint saves
    the position of the last batch trained on, not of those read ahead. Errors in the thread
    are raised by `__next__`.
    """

    _DONE = object()

    def __init__(self, data, prepare: Callable[[dict], Any], depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._produce, args=(data, prepare), name="batch-prefetch", daemon=True
        )
        self._thread.start()

    def _produce(self, data, prepare) -> None:
        try:
            while not self._stop.is_set():
                item = (prepare(next(data)), data.get_state())
                self._put(item)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._put(error if not isinstance(error, StopIteration) else self._DONE)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._DONE:
            self._queue.put(item)  # Stays exhausted.
            raise StopIteration
        if isinstance(item, BaseException):
            self._queue.put(item)
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (it may have read up to `depth` + 1 batches nobody consumed)."""
        self._stop.set()
        self._thread.join()


def _check_finite(step_number: int, metrics, max_streak: int) -> dict[str, float]:
    """Fetches one step's metrics; logs a refused update and stops after too many in a row."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if values["update_skipped"]:
        streak = int(values["nonfinite_streak"])
        logging.warning(
            "step %d: non-finite loss or gradients; the update was not applied (%d in a row)",
            step_number,
            streak,
        )
        if streak >= max_streak:
            raise TrainingError(
                f"{streak} train steps in a row (up to step {step_number}) produced non-finite "
                f"losses or gradients, so training stopped (config.trainer.max_nonfinite_steps="
                f"{max_streak}). Params are those of the last finite step. Lower the learning "
                f"rate, enable config.optimizers.<net>.grad_clip_norm, or check the data"
            )
    return values

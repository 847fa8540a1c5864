"""Orbax checkpoints of the train state plus the data iterator's position.

A checkpoint holds `state` (the whole `TrainState`: params, optimizer state, EMA,
step, RNG) and `data` (the iterator state as JSON), so a resumed run continues bit
for bit. Restoring takes abstract arrays carrying the *current* mesh's shardings,
so a run saved on one mesh resumes on another. A latest checkpoint that cannot be
read is moved aside (never deleted) and the previous one is used.
"""

from __future__ import annotations

import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from genctl_jax.errors import CheckpointError
from genctl_jax.parallel import distributed

CORRUPT_DIR = "corrupt_checkpoints"


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's pytree handler, writing replicated arrays in slices only across processes.

    Replica-parallel saving splits each replicated array into one slice per replica so
    that hosts share the writing. Within one process it only adds an eager slice per
    array and device: on 8 CPU devices that made a small model's save take ~10 s.
    """
    scalar = ocp.type_handlers.ScalarHandler()
    arrays = ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, scalar),
        (float, scalar),
        (np.number, scalar),
        (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, arrays),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class Checkpointer:
    """Saves and restores (state, data iterator state) under `directory/<step>`."""

    def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 3, async_save=True):
        self.directory = pathlib.Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict) -> bool:
        """Starts saving (asynchronously when enabled); returns whether it saved."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def restore(
        self, abstract_state: Any, step: int | None = None, *, partial: bool = False
    ) -> tuple[Any, dict, int] | None:
        """Restores `step` (default: the newest readable one) onto `abstract_state`'s shardings.

        partial: `abstract_state` is a nested dict holding only some of the saved leaves (e.g.
        {"ema_params": {"controlnet": ...}}); only those are read.
        Returns (state, data_state, step), or None when there is no checkpoint.
        """
        if step is not None:
            return self._restore(step, abstract_state, partial) + (step,)
        for candidate in reversed(self.all_steps()):
            try:
                return self._restore(candidate, abstract_state, partial) + (candidate,)
            except (CheckpointError, jax.errors.JaxRuntimeError) as error:
                kept = self._move_aside(candidate)
                logging.warning(
                    "Checkpoint at step %d cannot be read (%s); moved it to %s and trying "
                    "the previous one.",
                    candidate,
                    str(error)[:300],
                    kept,
                )
        return None

    def _restore(self, step: int, abstract_state: Any, partial: bool) -> tuple[Any, dict]:
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        abstract_state,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
                        partial_restore=partial,
                    ),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except jax.errors.JaxRuntimeError:
            raise
        except Exception as error:  # orbax raises many types for unreadable files
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} cannot be restored: "
                f"{type(error).__name__}: {error}"
            ) from error
        return restored.state, dict(restored.data)

    def _move_aside(self, step: int) -> pathlib.Path:
        corrupt = self.directory.parent / CORRUPT_DIR
        target, n = corrupt / str(step), 1
        while target.exists():
            target, n = corrupt / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            corrupt.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        # Named by directory too: a run's checkpoints and its best checkpoint each need their own
        # barrier (a name is used once), and the name must be the same on every host.
        distributed.barrier(f"genctl_jax: moved {self.directory.name}/{step} aside")
        self._manager.reload()
        return target

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

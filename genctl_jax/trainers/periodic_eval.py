"""Evaluation while training: every `config.eval.every_steps`, score the EMA params.

Each evaluation draws `config.eval.num_samples` samples with the run's `config.sampling`
and the same noise (`config.eval.seed`), scores them with `metrics.evaluation` and writes
the scalars as `eval/<name>` to `metrics.jsonl` and TensorBoard. With
`config.eval.best_metric`, the state of the best-scoring step is saved in
WORKDIR/best_checkpoint (one checkpoint, replaced when beaten) and described in
WORKDIR/eval/best.json, which a resumed run reads back.
"""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
from absl import logging

from genctl_jax.diffusion import samplers
from genctl_jax.errors import ConfigError
from genctl_jax.io.checkpoints import Checkpointer
from genctl_jax.metrics import evaluation
from genctl_jax.trainers import generation
from genctl_jax.trainers.saved_run import BEST_CHECKPOINT_DIR


class PeriodicEvaluation:
    """Called with (step, state, data_state) at the evaluation steps of a run."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path, mesh, task):
        if not hasattr(task, "generate"):
            raise ConfigError(
                f"config.eval.every_steps={config.eval.every_steps}: periodic evaluation "
                f"samples a diffusion model, and this run's task is {config.task.name!r}; "
                f"set config.eval.every_steps=0"
            )
        e = config.eval
        self.config, self.task = config, task
        self.metric = e.best_metric
        options = samplers.options_from_config(config.sampling, config.diffusion)
        self.generator = generation.Generator(task, mesh, options, e.batch_size)
        self.conditions = evaluation.conditions_for(task, config, e.num_samples)
        self.controls, self.control_maps = (), None
        if config.task.name == "controlnet":
            self.controls, self.control_maps = evaluation.controls_for(task, config, e.num_samples)
        self.evaluator = evaluation.Evaluator.from_config(e, mesh, config.data, workdir)
        self._text_encoder = None  # Frozen encoder of a run that read cached embeddings.
        self.best_file = workdir / "eval" / "best.json"
        self.best = None
        if self.metric and self.best_file.exists():
            self.best = json.loads(self.best_file.read_text())
        self.checkpointer = None
        if self.metric:
            self.checkpointer = Checkpointer(
                workdir / BEST_CHECKPOINT_DIR, max_to_keep=1, async_save=False
            )

    def _params(self, state) -> dict:
        params = {**state.params, **state.ema_params}
        if "text_encoder" not in params and getattr(self.task, "encoder", None) is not None:
            if self._text_encoder is None:  # Loaded from disk once.
                self._text_encoder = generation.with_text_encoder(self.task, {})["text_encoder"]
            params["text_encoder"] = self._text_encoder
        return params

    def __call__(self, step: int, state, data_state) -> dict[str, float]:
        params = self._params(state)
        e = self.config.eval
        samples = np.concatenate(
            list(self.generator.draw(params, e.num_samples, e.seed, self.conditions, self.controls))
        )
        scores = self.evaluator.evaluate(samples, self.conditions, self.control_maps)
        logging.info("Evaluation at step %d: %s", step, evaluation.headline(scores))
        if self.metric:
            if self.metric not in scores:
                raise ConfigError(
                    f"config.eval.best_metric={self.metric!r} is not among this run's "
                    f"evaluation scalars {sorted(scores)}"
                )
            value = scores[self.metric]
            if evaluation.better(self.metric, value, self.best and self.best["value"]):
                self.checkpointer.save(step, state, data_state)
                self.best = {"step": step, "metric": self.metric, "value": value}
                if jax.process_index() == 0:
                    self.best_file.parent.mkdir(parents=True, exist_ok=True)
                    self.best_file.write_text(json.dumps(self.best, indent=2) + "\n")
                logging.info("Best %s so far (%.4g): kept step %d", self.metric, value, step)
        return scores

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()

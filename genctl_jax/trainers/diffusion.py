"""Gaussian diffusion training: denoise q(x_t | x_0) with a UNet, optionally class-conditional.

One network, `model`. Each example gets a uniform timestep, Gaussian noise and, for
classifier-free guidance, its label replaced by the learned null class with probability
`config.task.cond_drop_prob`. The loss is the (optionally min-SNR weighted) MSE between
the model output and the target of `config.diffusion.prediction_type`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from genctl_jax import models
from genctl_jax.diffusion import prediction, samplers, schedules
from genctl_jax.errors import ConfigError
from genctl_jax.trainers.task import Phase, Task


class DiffusionTask(Task):
    """Noise-prediction training and guided sampling of `config.model` (a UNet)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.model = models.build(config.model)
        self.schedule = schedules.from_config(config.diffusion)
        self.num_classes = config.model.num_classes
        self.sampling = samplers.options_from_config(config.sampling, config.diffusion)

    @property
    def null_label(self) -> int:
        """The class id of the learned unconditional embedding."""
        return self.num_classes

    def init_params(self, rng, batch):
        image = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        labels = jnp.zeros((1,), jnp.int32) if self.num_classes else None
        return {"model": self.model.init(rng, image, t, labels)["params"]}

    @property
    def phases(self):
        return (Phase("denoise", ("model",), self.loss),)

    def loss(self, params, batch, rng, step):
        del step
        n = batch["image"].shape[0]
        k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 4)
        labels = None
        if self.num_classes:
            drop = jax.random.bernoulli(k_drop, self.config.task.cond_drop_prob, (n,))
            labels = jnp.where(drop, self.null_label, batch["label"])

        def denoise(x_t, t):
            return self.model.apply(
                {"params": params["model"]}, x_t, t, labels, train=True, rngs={"dropout": k_dropout}
            )

        return self.denoising_loss(batch["image"], k_t, k_noise, denoise)

    def denoising_loss(self, x0, k_t, k_noise, denoise):
        """(Weighted MSE of `denoise(x_t, t)` vs the target at uniform timesteps, metrics)."""
        t = jax.random.randint(k_t, (x0.shape[0],), 0, self.schedule.num_timesteps)
        noise = jax.random.normal(k_noise, x0.shape, x0.dtype)
        x_t = schedules.q_sample(self.schedule, x0, t, noise)
        out = denoise(x_t, t)
        d = self.config.diffusion
        target = prediction.training_target(d.prediction_type, x0, noise, t, self.schedule)
        mse = jnp.mean(jnp.square(out - target), axis=tuple(range(1, x0.ndim)))
        weight = prediction.loss_weight(
            d.loss_weighting, d.prediction_type, schedules.snr(self.schedule, t), d.min_snr_gamma
        )
        return jnp.mean(weight * mse), {"mse": jnp.mean(mse)}

    def generate(self, params, rng, labels, num_samples: int, options: samplers.SamplerOptions):
        """`num_samples` images in [-1, 1]; `labels` [N] int or None (unconditional)."""
        model_params = params["model"]

        def model_fn(x, t, cond):
            return self.model.apply({"params": model_params}, x, t, cond)

        shape = (num_samples, *self.image_shape)
        uncond = None if labels is None else jnp.full_like(labels, self.null_label)
        x0 = samplers.sample(model_fn, self.schedule, rng, shape, options, labels, uncond)
        return jnp.clip(x0, -1.0, 1.0)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.config.data.image_size
        return (size, size, self.config.model.in_channels)

    def sample(self, params, rng, batch):
        """The periodic grid: the first `trainer.num_samples` labels of the sample batch."""
        n = self.config.trainer.num_samples
        labels = batch["label"][:n] if self.num_classes else None
        return self.generate(params, rng, labels, n, self.sampling)

    @classmethod
    def validate(cls, config):
        schedules.validate(config.diffusion)
        samplers.validate(config.sampling, config.diffusion)
        p = config.task.get("cond_drop_prob")
        if not isinstance(p, int | float) or not 0.0 <= p < 1.0:
            raise ConfigError(
                f"config.task.cond_drop_prob={p!r}: expected a probability in [0, 1) "
                f"(0.1-0.2 for classifier-free guidance)"
            )
        if config.model.num_classes and "label" not in config.data.fields:
            raise ConfigError(
                f"config.model.num_classes={config.model.num_classes} makes the model "
                f"class-conditional, but config.data.fields={tuple(config.data.fields)!r} "
                f"lacks 'label'; add it or set num_classes=0"
            )
        if config.data.name == "shapes" and config.model.num_classes:
            from genctl_jax.data import shapes

            if config.model.num_classes != shapes.NUM_CLASSES:
                raise ConfigError(
                    f"config.model.num_classes={config.model.num_classes}, but the shapes "
                    f"dataset has {shapes.NUM_CLASSES} classes; set num_classes="
                    f"{shapes.NUM_CLASSES}"
                )
        warn_if_unguidable(config, config.sampling.guidance_scale)


def warn_if_unguidable(config: ml_collections.ConfigDict, guidance_scale: float) -> None:
    """Guidance needs an unconditional model, which only condition dropout trains."""
    conditional = config.model.num_classes or config.task.name in ("text_to_image", "controlnet")
    if guidance_scale != 1.0 and not conditional:
        logging.warning(
            "guidance_scale=%s has no effect: this model is unconditional (num_classes=0)",
            guidance_scale,
        )
    elif guidance_scale != 1.0 and not config.task.cond_drop_prob:
        logging.warning(
            "guidance_scale=%s, but this model was trained without condition dropout "
            "(config.task.cond_drop_prob=0), so its null condition is untrained and guidance will "
            "not behave; use guidance_scale=1 or train with cond_drop_prob 0.1-0.2",
            guidance_scale,
        )

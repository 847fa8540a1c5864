"""GAN training on the shared core: pix2pix / pix2pixHD, SPADE (GauGAN) and StyleGAN2.

Networks: `generator` and `discriminator` (SPADE with its VAE adds `encoder`, trained with the
generator). One jitted step alternates the updates: the discriminator's phase first, then the
generator's, which sees the discriminator just updated. The generator's output is recomputed
in its own phase (with the same params, so the same function) rather than carried over.
EMA (`config.trainer.ema_decay`) is kept for the generator only.

- `Pix2PixTask` (task.name 'pix2pix'): a condition map -> image (`config.task.condition`:
  'edges' or 'seg' colour maps from the batch, in [-1, 1]); loss adversarial (D on
  (condition, image) pairs) + `l1_weight` * L1 to the target (pix2pix: lambda 100) +
  `feature_matching_weight` * discriminator feature matching (pix2pixHD: 10).
- `SpadeTask` (task.name 'spade'): a segmentation label map -> image; the generator reads the
  map through SPADE, the discriminator sees (one-hot map, image); hinge loss and feature
  matching as GauGAN, plus `kl_weight` * KL of the style encoder with `use_vae`.
- `StyleGAN2Task` (task.name 'stylegan2'): unconditional images from z. Non-saturating loss;
  style mixing in the generator phase; lazy regularisation (Karras et al. 2020) as extra
  phases, each scaled by its interval: R1 on reals (gamma `r1_gamma`) every `r1_every` steps
  and the path-length penalty (`pl_weight`, on a batch halved `pl_batch_shrink` times) every
  `pl_every`. Buffers (task.BUFFERS): the path-length running mean and the w average that
  truncation uses, both updated inside the step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genctl_jax import control as control_lib
from genctl_jax.errors import ConfigError
from genctl_jax.gan import losses
from genctl_jax.models.gan import pix2pix, spade, stylegan2
from genctl_jax.trainers import optim
from genctl_jax.trainers.task import BUFFERS, Phase, Task

# Condition kinds of the paired tasks -> the dataset field they come from.
CONDITION_SOURCES = {"edges": "edges", "seg": "segmentation"}


def default_config() -> ml_collections.ConfigDict:
    """`config.task` fields of the GAN tasks (each task reads its own)."""
    c = ml_collections.ConfigDict()
    c.name = "pix2pix"
    c.gan_loss = "nonsaturating"  # 'nonsaturating', 'hinge' or 'lsgan' (gan.losses).
    # Paired tasks.
    c.condition = "edges"  # pix2pix: 'edges' or 'seg'; SPADE always reads 'segmentation'.
    c.l1_weight = 100.0  # pix2pix's lambda; 0 for pix2pixHD and SPADE.
    c.feature_matching_weight = 0.0  # pix2pixHD and SPADE: 10.
    c.kl_weight = 0.05  # SPADE with use_vae.
    # StyleGAN2.
    c.r1_gamma = 10.0  # 0 disables R1.
    c.r1_every = 16
    c.pl_weight = 2.0  # 0 disables the path-length penalty.
    c.pl_every = 4
    c.pl_batch_shrink = 2
    c.pl_decay = 0.01
    return c


def adam(learning_rate: float, b1: float, b2: float) -> ml_collections.ConfigDict:
    """An `optimizers.<network>` block of Adam without gradient clipping, as the GAN papers."""
    return optim.default_config(
        name="adam", learning_rate=learning_rate, b1=b1, b2=b2, grad_clip_norm=0.0
    )


def lazy_adam(learning_rate: float, interval: int) -> ml_collections.ConfigDict:
    """StyleGAN2's Adam (betas 0, 0.99) adjusted for a lazy regulariser every `interval` steps
    (`losses.lazy_adam_hparams`)."""
    return adam(*losses.lazy_adam_hparams(learning_rate, 0.0, 0.99, interval))


def _scale_mean(per_scale) -> jax.Array:
    return sum(per_scale) / len(per_scale)


class _GanTask(Task):
    """What the GAN tasks share: generator EMA and the discriminator phase's loss form."""

    @property
    def gan(self) -> losses.GanLoss:
        return losses.gan_losses(self.config.task.gan_loss)

    @property
    def ema_networks(self):
        return ("generator",)

    @property
    def sampling_networks(self):
        return ("generator",)

    @classmethod
    def validate(cls, config):
        if config.task.get("gan_loss") not in losses.GAN_LOSSES:
            raise ConfigError(
                f"config.task.gan_loss={config.task.get('gan_loss')!r}: expected one of "
                f"{', '.join(losses.GAN_LOSSES)}"
            )
        if "image" not in config.data.fields:
            raise ConfigError(
                f"config.data.fields={tuple(config.data.fields)!r} lacks 'image', the GAN's "
                f"real examples; add it"
            )


class Pix2PixTask(_GanTask):
    """Paired translation: `condition` [B, H, W, C] in [-1, 1] -> image (pix2pix, pix2pixHD)."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        networks = pix2pix.from_config(config.model)
        self.generator, self.discriminator = networks.generator, networks.discriminator

    # ---- Data.

    @property
    def condition_channels(self) -> int:
        return 1 if self.config.task.condition == "edges" else 3

    def condition_from_batch(self, batch) -> np.ndarray:
        """float32 [B, H, W, C] in [-1, 1]: the edge map, or the label map's palette colours."""
        kind = self.config.task.condition
        source = np.asarray(batch[CONDITION_SOURCES[kind]])
        if kind == "edges":
            if source.dtype != np.uint8:  # The pipeline resizes uint8 maps to floats in [0, 1].
                source = np.clip(np.rint(source * 255.0), 0, 255).astype(np.uint8)
            unit = control_lib.to_model_input(source, 1)
        else:
            unit = control_lib.extract("seg", source.astype(np.int32), channels=3)
        return np.asarray(unit, np.float32) * 2.0 - 1.0

    def prepare_batch(self, batch):
        batch = dict(batch)
        batch["condition"] = self.condition_from_batch(batch)
        batch.pop(CONDITION_SOURCES[self.config.task.condition])
        return batch

    # ---- Networks.

    def init_params(self, rng, batch):
        size = batch["image"].shape[1]
        image = jnp.zeros((1, size, size, 3), jnp.float32)
        condition = jnp.zeros((1, size, size, self.condition_channels), jnp.float32)
        k_g, k_d = jax.random.split(rng)
        return {
            "generator": self.generator.init(k_g, condition)["params"],
            "discriminator": self.discriminator.init(k_d, image, condition)["params"],
        }

    def generate(self, params, condition, rng=None):
        """Images in [-1, 1]; with `rng`, in training mode (dropout on)."""
        train = rng is not None
        return self.generator.apply(
            {"params": params["generator"]},
            condition,
            train=train,
            rngs={"dropout": rng} if train else {},
        )

    def _discriminate(self, params, image, condition):
        return self.discriminator.apply({"params": params["discriminator"]}, image, condition)

    # ---- Losses.

    @property
    def phases(self):
        return (
            Phase("discriminator", ("discriminator",), self.d_loss),
            Phase("generator", ("generator",), self.g_loss),
        )

    def d_loss(self, params, batch, rng, step):
        del step
        real, condition = batch["image"], batch["condition"]
        fake = jax.lax.stop_gradient(self.generate(params, condition, rng))
        # Reals and fakes in one batched pass (the norms are per sample).
        outputs = self._discriminate(
            params, jnp.concatenate([real, fake]), jnp.concatenate([condition, condition])
        )
        n = real.shape[0]
        per_scale = [self.gan.d(logits[:n], logits[n:]) for logits, _ in outputs]
        loss = _scale_mean(per_scale)
        return loss, {
            "d_real": jnp.mean(outputs[0][0][:n]),
            "d_fake": jnp.mean(outputs[0][0][n:]),
        }

    def g_loss(self, params, batch, rng, step):
        del step
        real, condition = batch["image"], batch["condition"]
        fake = self.generate(params, condition, rng)
        adversarial, metrics = self._adversarial_and_matching(params, real, fake, condition)
        l1 = losses.l1(fake, real)
        loss = adversarial + self.config.task.l1_weight * l1
        return loss, {**metrics, "l1": l1}

    def _adversarial_and_matching(self, params, real, fake, condition):
        """(adversarial + weighted feature matching, metrics) for the generator phase."""
        weight = self.config.task.feature_matching_weight
        if weight:
            n = real.shape[0]
            outputs = self._discriminate(
                params, jnp.concatenate([real, fake]), jnp.concatenate([condition, condition])
            )
            fake_logits = [logits[n:] for logits, _ in outputs]
            matching = losses.feature_matching(
                [[f[:n] for f in features] for _, features in outputs],
                [[f[n:] for f in features] for _, features in outputs],
            )
        else:
            fake_logits = [logits for logits, _ in self._discriminate(params, fake, condition)]
            matching = jnp.zeros((), jnp.float32)
        adversarial = _scale_mean([self.gan.g(logits) for logits in fake_logits])
        metrics = {"adversarial": adversarial, "feature_matching": matching}
        return adversarial + weight * matching, metrics

    def sample(self, params, rng, batch):
        """Each tile: the condition (as an image), the generated image and the target."""
        del rng
        n = self.config.trainer.num_samples
        condition, real = batch["condition"][:n], batch["image"][:n]
        fake = self.generate(params, condition)
        shown = jnp.broadcast_to(condition[..., :3], real.shape)
        return jnp.concatenate([shown, fake, real], axis=2)

    @classmethod
    def validate(cls, config):
        super().validate(config)
        kind = config.task.get("condition")
        if kind not in CONDITION_SOURCES:
            raise ConfigError(
                f"config.task.condition={kind!r}: expected one of {', '.join(CONDITION_SOURCES)}"
            )
        if CONDITION_SOURCES[kind] not in config.data.fields:
            raise ConfigError(
                f"config.task.condition={kind!r} reads the dataset field "
                f"{CONDITION_SOURCES[kind]!r}, which config.data.fields="
                f"{tuple(config.data.fields)!r} lacks; add it"
            )
        for field in ("l1_weight", "feature_matching_weight"):
            if config.task.get(field, -1) < 0:
                raise ConfigError(f"config.task.{field}={config.task.get(field)!r}: expected >= 0")


class SpadeTask(Pix2PixTask):
    """Semantic image synthesis: label ids [B, H, W] -> image through SPADE (GauGAN)."""

    def __init__(self, config: ml_collections.ConfigDict):
        Task.__init__(self, config)
        networks = spade.from_config(config.model)
        self.generator, self.discriminator = networks.generator, networks.discriminator
        self.encoder = networks.encoder
        self.num_classes = config.model.generator.num_classes

    def condition_from_batch(self, batch) -> np.ndarray:
        labels = np.asarray(batch["segmentation"]).astype(np.int32)
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ConfigError(
                f"a segmentation map holds label ids {labels.min()}..{labels.max()}, outside "
                f"0..{self.num_classes - 1}; set config.model.generator.num_classes to at least "
                f"{labels.max() + 1}"
            )
        return labels

    def prepare_batch(self, batch):
        batch = dict(batch)
        batch["condition"] = self.condition_from_batch(batch)
        batch.pop("segmentation")
        return batch

    def _one_hot(self, labels):
        return spade.one_hot_labels(labels, self.num_classes)

    def init_params(self, rng, batch):
        size = batch["image"].shape[1]
        image = jnp.zeros((1, size, size, 3), jnp.float32)
        labels = jnp.zeros((1, size, size), jnp.int32)
        k_g, k_d, k_e, k_z = jax.random.split(rng, 4)
        params = {
            "generator": self.generator.init({"params": k_g, "latent": k_z}, labels)["params"],
            "discriminator": self.discriminator.init(k_d, image, self._one_hot(labels))["params"],
        }
        if self.encoder is not None:
            params["encoder"] = self.encoder.init(k_e, image)["params"]
        return params

    def generate(self, params, condition, rng=None, z=None):
        """Images in [-1, 1] for label ids; with a VAE and no z, z ~ N(0, I) from `rng`."""
        if self.encoder is not None and z is None and rng is None:
            rng = jax.random.PRNGKey(0)
        rngs = {"latent": rng} if rng is not None else {}
        return self.generator.apply({"params": params["generator"]}, condition, z, rngs=rngs)

    def _discriminate(self, params, image, condition):
        return self.discriminator.apply(
            {"params": params["discriminator"]}, image, self._one_hot(condition)
        )

    @property
    def phases(self):
        trained = ("generator",) + (("encoder",) if self.encoder is not None else ())
        return (
            Phase("discriminator", ("discriminator",), self.d_loss),
            Phase("generator", trained, self.g_loss),
        )

    def g_loss(self, params, batch, rng, step):
        del step
        real, condition = batch["image"], batch["condition"]
        k_z, k_g = jax.random.split(rng)
        z, metrics = None, {}
        kl = jnp.zeros((), jnp.float32)
        if self.encoder is not None:
            mu, logvar = self.encoder.apply({"params": params["encoder"]}, real)
            z = spade.reparameterize(k_z, mu, logvar)
            kl = spade.kl_divergence(mu, logvar)
            metrics["kl"] = kl
        fake = self.generate(params, condition, k_g, z)
        adversarial, more = self._adversarial_and_matching(params, real, fake, condition)
        l1 = losses.l1(fake, real)
        loss = adversarial + self.config.task.l1_weight * l1 + self.config.task.kl_weight * kl
        return loss, {**metrics, **more, "l1": l1}

    def sample(self, params, rng, batch):
        """Each tile: the label map's palette colours, the generated image and the target."""
        n = self.config.trainer.num_samples
        labels, real = batch["condition"][:n], batch["image"][:n]
        fake = self.generate(params, labels, rng)
        palette = jnp.asarray(control_lib.voc_palette(self.num_classes), jnp.float32)
        shown = palette[labels] / 127.5 - 1.0
        return jnp.concatenate([shown, fake, real], axis=2)

    @classmethod
    def validate(cls, config):
        _GanTask.validate(config)
        if "segmentation" not in config.data.fields:
            raise ConfigError(
                f"SPADE reads label maps from the dataset field 'segmentation', which "
                f"config.data.fields={tuple(config.data.fields)!r} lacks; add it"
            )
        for field in ("l1_weight", "feature_matching_weight", "kl_weight"):
            if config.task.get(field, -1) < 0:
                raise ConfigError(f"config.task.{field}={config.task.get(field)!r}: expected >= 0")


class StyleGAN2Task(_GanTask):
    """Unconditional StyleGAN2 with lazy R1 and path-length regularisation."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        networks = stylegan2.from_config(config.model)
        self.generator, self.discriminator = networks.generator, networks.discriminator
        self.z_dim = config.model.z_dim

    @property
    def sampling_networks(self):
        return ("generator", BUFFERS)  # Truncation reads the tracked w average.

    def _z(self, rng, n):
        return jax.random.normal(rng, (n, self.z_dim), jnp.float32)

    def init_params(self, rng, batch):
        size = batch["image"].shape[1]
        k_g, k_d, k_z = jax.random.split(rng, 3)
        z = self._z(k_z, 1)
        image = jnp.zeros((1, size, size, self.config.model.img_channels), jnp.float32)
        rngs = {"params": k_g, "noise": k_z, "mixing": k_z}
        return {
            "generator": self.generator.init(rngs, z, z_mix=z)["params"],
            "discriminator": self.discriminator.init(k_d, image)["params"],
            BUFFERS: {
                "pl_mean": jnp.zeros((), jnp.float32),
                "w_avg": jnp.zeros((self.config.model.w_dim,), jnp.float32),
            },
        }

    def _g(self, params, method, *args, rng=None, **kwargs):
        rngs = {"noise": rng} if rng is not None else {}
        return self.generator.apply(
            {"params": params["generator"]}, *args, method=method, rngs=rngs, **kwargs
        )

    def _d(self, params, images):
        return self.discriminator.apply({"params": params["discriminator"]}, images)

    def _mixed_fakes(self, params, n, rng):
        """(images, ws before mixing) of n fresh latents, with style mixing."""
        k_z, k_mix, k_cross, k_noise = jax.random.split(rng, 4)
        ws = self._g(params, "map", self._z(k_z, n))
        ws_mix = self._g(params, "map", self._z(k_mix, n))
        prob = self.config.model.style_mixing_prob
        mixed = stylegan2.mix_styles(k_cross, ws, ws_mix, prob) if prob > 0 else ws
        return self._g(params, "synthesize", mixed, rng=k_noise), ws

    @property
    def phases(self):
        t = self.config.task
        phases = [Phase("discriminator", ("discriminator",), self.d_loss)]
        if t.r1_gamma > 0:
            phases.append(Phase("r1", ("discriminator",), self.r1_loss, every=t.r1_every))
        phases.append(Phase("generator", ("generator",), self.g_loss))
        if t.pl_weight > 0:
            phases.append(Phase("path_length", ("generator",), self.pl_loss, every=t.pl_every))
        return tuple(phases)

    def d_loss(self, params, batch, rng, step):
        del step
        real = batch["image"]
        fake, _ = self._mixed_fakes(params, real.shape[0], rng)
        # Two passes: minibatch-std groups must not mix reals with fakes.
        real_logits = self._d(params, real)
        fake_logits = self._d(params, jax.lax.stop_gradient(fake))
        loss = self.gan.d(real_logits, fake_logits)
        return loss, {"d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}

    def r1_loss(self, params, batch, rng, step):
        del rng, step
        t = self.config.task
        penalty = losses.r1_penalty(lambda x: self._d(params, x), batch["image"])
        return t.r1_gamma / 2 * penalty * losses.lazy_scale(t.r1_every), {"r1": penalty}

    def g_loss(self, params, batch, rng, step):
        del step
        fake, ws = self._mixed_fakes(params, batch["image"].shape[0], rng)
        loss = self.gan.g(self._d(params, fake))
        buffers = dict(params[BUFFERS])
        buffers["w_avg"] = stylegan2.update_w_avg(
            buffers["w_avg"], ws[:, 0], self.config.model.w_avg_beta
        )
        return loss, {BUFFERS: buffers}

    def pl_loss(self, params, batch, rng, step):
        del step
        t = self.config.task
        n = max(1, batch["image"].shape[0] // t.pl_batch_shrink)
        k_z, k_noise, k_y = jax.random.split(rng, 3)
        ws = self._g(params, "map", self._z(k_z, n))
        synthesize = lambda w: self._g(params, "synthesize", w, rng=k_noise)  # noqa: E731
        penalty, pl_mean, lengths = losses.path_length_penalty(
            synthesize, ws, k_y, params[BUFFERS]["pl_mean"], t.pl_decay
        )
        buffers = dict(params[BUFFERS], pl_mean=pl_mean)
        loss = t.pl_weight * penalty * losses.lazy_scale(t.pl_every)
        return loss, {"pl_penalty": penalty, "pl_length": jnp.mean(lengths), BUFFERS: buffers}

    def generate(self, params, rng, n, truncation: float = 1.0, deterministic: bool = False):
        """n images from fresh latents, truncated towards the tracked w average by psi."""
        k_z, k_noise = jax.random.split(rng)
        ws = self._g(params, "map", self._z(k_z, n))
        if truncation != 1.0:
            ws = stylegan2.truncate(ws, params[BUFFERS]["w_avg"], truncation)
        return self._g(params, "synthesize", ws, deterministic, rng=k_noise)

    def sample(self, params, rng, batch):
        del batch
        return self.generate(params, rng, self.config.trainer.num_samples)

    @classmethod
    def validate(cls, config):
        super().validate(config)
        t = config.task
        for field in ("r1_gamma", "pl_weight"):
            if t.get(field, -1) < 0:
                raise ConfigError(f"config.task.{field}={t.get(field)!r}: expected >= 0")
        for field in ("r1_every", "pl_every", "pl_batch_shrink"):
            if not isinstance(t.get(field), int) or t.get(field) < 1:
                raise ConfigError(f"config.task.{field}={t.get(field)!r}: expected an integer >= 1")

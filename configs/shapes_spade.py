"""SPADE (GauGAN) on the embedded shapes dataset: segmentation map -> image.

Launch:

  python -m genctl_jax.train --config configs/shapes_spade.py --workdir runs/shapes_spade

The condition is the dataset's `segmentation` map (0 background, 1 + shape id: 7 classes); the
generator reads it through SPADE normalisation in every residual block, the two-scale
discriminator sees (one-hot map, image). GauGAN's recipe (Park et al. 2019): hinge loss,
feature matching (weight 10), Adam with betas (0, 0.999) and the two time-scale rule
(generator 1e-4, discriminator 4e-4). The map fixes each object's shape and place, not its
colour, so with `vae` a style encoder (KL weight 0.05) makes the colours a choice of z.

Variants (comma-separated after a colon):
  vae        the VAE style encoder (multi-modal outputs).
  steps=N    train steps.
  tiny       tests: 32 px (SPADE up-samples 5 times), tiny networks, a few steps.
"""

from genctl_jax import configlib
from genctl_jax.data import shapes
from genctl_jax.models.gan import spade
from genctl_jax.trainers import gan


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, vae=False, steps=3000)
    c = configlib.base_config()

    c.data.name = "shapes"
    c.data.shapes_config = "32"
    c.data.image_size = 32
    c.data.batch_size = 16
    c.data.fields = ("image", "segmentation")

    c.model = spade.default_config()
    c.model.generator.update(
        num_classes=1 + shapes.NUM_SHAPES, base_channels=8, spade_hidden=32, use_vae=arg.vae,
        z_dim=32,
    )  # fmt: skip
    c.model.discriminator.update(base_channels=32, num_layers=2)
    c.model.encoder.update(base_channels=16, num_layers=4)

    c.task = gan.default_config()
    c.task.name = "spade"
    c.task.gan_loss = "hinge"
    c.task.l1_weight = 0.0
    c.task.feature_matching_weight = 10.0
    c.task.kl_weight = 0.05

    c.optimizers.generator = gan.adam(1e-4, 0.0, 0.999)
    c.optimizers.discriminator = gan.adam(4e-4, 0.0, 0.999)
    if arg.vae:
        c.optimizers.encoder = c.optimizers.generator.copy_and_resolve_references()

    c.trainer.num_train_steps = arg.steps
    c.trainer.ema_decay = 0.999
    c.trainer.log_every = 100
    c.trainer.checkpoint_every = 1000
    c.trainer.sample_every = 1000
    c.trainer.num_samples = 16

    if arg.tiny:
        c.data.batch_size = 8
        c.data.shapes_config = "tiny32"
        c.model.generator.update(base_channels=2, spade_hidden=8, z_dim=8)
        c.model.discriminator.update(base_channels=8)
        c.model.encoder.update(base_channels=4)
        c.sharding.max_replicated_fraction = 0.3
        configlib.tiny_trainer(c.trainer, 2)
    return c

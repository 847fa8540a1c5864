"""StyleGAN2 on the embedded shapes dataset's images (unconditional).

Launch:

  python -m genctl_jax.train --config configs/shapes_stylegan2.py --workdir runs/shapes_stylegan2

then sample with truncation:

  python -m genctl_jax.sample --workdir runs/shapes_stylegan2 --num_samples 64 --truncation 0.7

StyleGAN2 (Karras et al. 2020) at 32 x 32 with narrow layers: mapping network (4 layers,
lr x 0.01), modulated convolutions with noise, skip generator, residual discriminator with
minibatch std. Config F's training: non-saturating loss, style mixing 0.9, R1 gamma 10 every
16 steps and path length weight 2 every 4 (lazy regularisation), Adam lr 2e-3 with betas
(0, 0.99), each network's settings scaled for its lazy interval (lr * c, beta ** c with
c = interval / (interval + 1)), generator EMA.

Variants (comma-separated after a colon):
  adain      StyleGAN-1's style blocks (conv + AdaIN) instead of modulated convolutions.
  steps=N    train steps.
  tiny       tests: 16 px, tiny networks, regularisers every 2 steps, a few steps.
"""

from genctl_jax import configlib
from genctl_jax.models.gan import stylegan2
from genctl_jax.trainers import gan


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, adain=False, steps=5000)
    c = configlib.base_config()

    c.data.name = "shapes"
    c.data.shapes_config = "32"
    c.data.image_size = 32
    c.data.batch_size = 16
    c.data.fields = ("image",)

    c.model = stylegan2.default_config()
    c.model.update(
        resolution=32, z_dim=128, w_dim=128, mapping_layers=4, channel_base=2048, channel_max=64,
        style_block="adain" if arg.adain else "modulated",
    )  # fmt: skip

    c.task = gan.default_config()
    c.task.name = "stylegan2"
    c.task.gan_loss = "nonsaturating"
    c.task.r1_gamma = 10.0
    c.task.r1_every = 16
    c.task.pl_weight = 2.0
    c.task.pl_every = 4

    c.trainer.num_train_steps = arg.steps
    c.trainer.ema_decay = 0.999
    c.trainer.log_every = 100
    c.trainer.checkpoint_every = 1000
    c.trainer.sample_every = 1000
    c.trainer.num_samples = 16

    if arg.tiny:
        c.data.image_size = 16
        c.data.batch_size = 8
        c.data.shapes_config = "tiny16"
        c.model.update(stylegan2.tiny_config())
        c.task.r1_every = 2
        c.task.pl_every = 2
        c.sharding.max_replicated_fraction = 0.3
        configlib.tiny_trainer(c.trainer, 2)

    c.optimizers.generator = gan.lazy_adam(2e-3, c.task.pl_every)
    c.optimizers.discriminator = gan.lazy_adam(2e-3, c.task.r1_every)
    return c

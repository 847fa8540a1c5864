"""StyleGAN2 config F on an FFHQ-like folder of aligned face images (unconditional).

Launch, with `folder` holding the images (any sub-folders, e.g. FFHQ's 00000/ ... 69000/;
PNG or JPEG, resized to `res` on the short side and centre-cropped):

  python -m genctl_jax.train --config configs/ffhq_stylegan2.py:folder=/data/ffhq,res=1024 \
      --workdir runs/ffhq_stylegan2 --config.mesh.fsdp=8

then sample with truncation:

  python -m genctl_jax.sample --workdir runs/ffhq_stylegan2 --num_samples 16 --truncation 0.7

Recipe (Karras et al. 2020, config F): z = w = 512, 8-layer mapping (lr x 0.01), channels
min(32768 / r, 512), skip generator, residual discriminator with minibatch std (group 4),
non-saturating loss, style mixing 0.9, Adam lr 2e-3 betas (0, 0.99) adjusted for the lazy
intervals, R1 every 16 steps, path length (weight 2) every 4, x-flips, batch 32, 25M images
shown, generator EMA with a half-life of 10k images. R1 gamma 10 at 1024 px, 1 below (the
low-resolution setting of Karras et al.'s 256 px FFHQ runs).

Variants (comma-separated after a colon):
  folder=DIR  the image folder (default /data/ffhq).
  res=N       image side, a power of two (default 256).
  gamma=G     R1 weight (default: 10 at 1024 px, else 1).
  steps=N     train steps (default: 25M images).
  tiny        tests: a tiny StyleGAN2 on the embedded shapes images (16 px).
"""

from genctl_jax import configlib
from genctl_jax.models.gan import stylegan2
from genctl_jax.trainers import gan

IMAGES_SHOWN = 25_000_000
EMA_HALF_LIFE_IMAGES = 10_000


def get_config(arg=None):
    arg = configlib.parse_arg(arg, folder="/data/ffhq", res=256, gamma=-1.0, steps=0, tiny=False)
    c = configlib.base_config()

    c.data.name = f"folder:{arg.folder}"
    c.data.image_size = arg.res
    c.data.batch_size = 32
    c.data.random_flip = True
    c.data.fields = ("image",)

    c.model = stylegan2.default_config()
    c.model.resolution = arg.res

    c.task = gan.default_config()
    c.task.name = "stylegan2"
    c.task.gan_loss = "nonsaturating"
    c.task.r1_gamma = arg.gamma if arg.gamma >= 0 else (10.0 if arg.res >= 1024 else 1.0)
    c.task.r1_every = 16
    c.task.pl_weight = 2.0
    c.task.pl_every = 4

    if arg.tiny:
        c.data.name = "shapes"
        c.data.shapes_config = "tiny16"
        c.data.image_size = 16
        c.data.batch_size = 8
        c.model.update(stylegan2.tiny_config())
        c.task.r1_every = 2
        c.task.pl_every = 2
        c.sharding.max_replicated_fraction = 0.3  # tiny widths do not split 8 ways
    c.optimizers.generator = gan.lazy_adam(2e-3, c.task.pl_every)
    c.optimizers.discriminator = gan.lazy_adam(2e-3, c.task.r1_every)

    batch = c.data.batch_size
    c.trainer.num_train_steps = arg.steps or IMAGES_SHOWN // batch
    c.trainer.ema_decay = 0.5 ** (batch / EMA_HALF_LIFE_IMAGES)
    c.trainer.log_every = 100
    c.trainer.checkpoint_every = 10_000
    c.trainer.sample_every = 10_000
    c.trainer.num_samples = 16
    if arg.tiny:
        configlib.tiny_trainer(c.trainer, 2)
    return c

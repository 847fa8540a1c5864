"""DDPM on CIFAR-10 (Ho et al. 2020): the paper's recipe, for users with the data prepared.

Prepare the data once (array_record, no TensorFlow needed to read it):

  tfds build cifar10 --file_format=array_record

Launch (on a TPU v3-8 the paper reports ~21 steps/s; 800k steps):

  python -m genctl_jax.train --config configs/cifar10_ddpm.py --workdir runs/cifar10_ddpm

Target: FID 3.17 and IS 9.46 with 1000-step ancestral sampling (REFERENCES.md). The model
is the paper's 35.7M-parameter UNet; linear betas 1e-4 -> 0.02 over T=1000; Adam lr 2e-4
with 5,000 warm-up steps, batch 128, grad clip 1.0, EMA 0.9999, random horizontal flips.
`:tiny` swaps in the tiny UNet and the embedded shapes data, for tests.
"""

from genctl_jax import configlib
from genctl_jax.diffusion import samplers, schedules
from genctl_jax.models import unet
from genctl_jax.trainers import optim


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False)
    c = configlib.base_config()

    c.data.name = "tfds:cifar10"
    c.data.image_size = 32
    c.data.batch_size = 128
    c.data.random_flip = True
    c.data.fields = ("image",)

    c.model = unet.ddpm_cifar10_config()

    c.diffusion = schedules.default_config()
    c.diffusion.schedule = "linear"
    c.diffusion.beta_start = 1e-4
    c.diffusion.beta_end = 0.02
    c.diffusion.prediction_type = "eps"
    c.diffusion.loss_weighting = "uniform"

    c.sampling = samplers.default_config()
    c.sampling.sampler = "ddpm"
    c.sampling.num_steps = 1000
    c.sampling.spacing = "leading"

    c.task.name = "diffusion"
    c.task.cond_drop_prob = 0.0  # Unconditional.

    c.optimizers.model = optim.default_config(
        name="adam", learning_rate=2e-4, warmup_steps=5000, grad_clip_norm=1.0
    )

    c.trainer.num_train_steps = 800_000
    c.trainer.ema_decay = 0.9999
    c.trainer.ema_warmup = False
    c.trainer.log_every = 1000
    c.trainer.checkpoint_every = 10_000
    c.trainer.sample_every = 50_000
    c.trainer.num_samples = 64

    if arg.tiny:
        c.data.name = "shapes"
        c.data.image_size = 16
        c.data.batch_size = 16
        c.data.shapes_config = "tiny16"
        c.model = unet.tiny_config()
        c.model.num_classes = 0
        c.sampling.num_steps = 4
        c.optimizers.model.warmup_steps = 2
        c.trainer.num_train_steps = 4
        c.trainer.log_every = 2
        c.trainer.checkpoint_every = 2
        c.trainer.sample_every = 0
        c.trainer.progress_bar = False
        c.sharding.max_replicated_fraction = 0.2  # tiny widths do not split 8 ways
    return c

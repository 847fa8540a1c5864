"""Convolutional autoencoder on the embedded shapes dataset (the foundation's demo).

Launch:

  python -m genctl_jax.train --config configs/shapes_autoencoder.py \
      --workdir runs/shapes_autoencoder

Variants after a colon, e.g. `configs/shapes_autoencoder.py:tiny` (what tests use) or
`:res=64`; override any field with `--config.a.b=value`, e.g.
`--config.mesh.fsdp=4 --config.trainer.num_train_steps=5000`.
"""

from genctl_jax import configlib
from genctl_jax.trainers import optim


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, res=32)
    c = configlib.base_config()

    c.data.name = "shapes"
    c.data.image_size = arg.res
    c.data.batch_size = 64
    c.data.random_flip = True
    c.data.fields = ("image",)

    c.model.name = "autoencoder"
    c.model.channels = 32
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.latent_channels = 4
    c.model.dropout = 0.0

    c.task.name = "autoencoder"
    c.task.l1_weight = 0.1  # Weight of the L1 term beside the L2 reconstruction loss.

    c.optimizers.model = optim.default_config(
        learning_rate=1e-3, schedule="cosine", warmup_steps=100, end_factor=0.1
    )

    c.trainer.num_train_steps = 1000
    c.trainer.ema_decay = 0.999
    c.trainer.log_every = 100
    c.trainer.checkpoint_every = 500
    c.trainer.sample_every = 500

    if arg.tiny:
        c.data.image_size = 16
        c.data.batch_size = 16
        c.data.shapes_config = "tiny16"
        c.model.channels = 8
        c.model.channel_mult = (1, 2)
        # Its 3- and 4-channel convs (7.5% of bytes) cannot be split 8 ways over fsdp.
        c.sharding.max_replicated_fraction = 0.1
        c.optimizers.model.warmup_steps = 2
        configlib.tiny_trainer(c.trainer, 4)
    return c

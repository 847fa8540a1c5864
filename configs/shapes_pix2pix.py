"""pix2pix on the embedded shapes dataset: edge map -> image (paired translation).

Launch:

  python -m genctl_jax.train --config configs/shapes_pix2pix.py --workdir runs/shapes_pix2pix

The condition is the dataset's `edges` map (one-pixel object contours, -1 background and +1
edge); the target is the scene it outlines (up to 3 objects, 32 x 32), so the generator must
fill each contour with a plausible colour. pix2pix's recipe (Isola et al. 2017): U-Net
generator with dropout, a PatchGAN on (edges, image) pairs, the non-saturating cGAN loss plus
100 x L1, Adam at 2e-4 with beta1 0.5 for both networks.

Variants (comma-separated after a colon):
  hd         pix2pixHD's global generator (residual blocks), two discriminator scales,
             LSGAN loss and feature matching (weight 10) instead of L1.
  seg        the segmentation map's palette colours as the condition instead of edges.
  steps=N    train steps.
  tiny       tests: 16 px, tiny networks, a few steps.
"""

from genctl_jax import configlib
from genctl_jax.models.gan import pix2pix
from genctl_jax.trainers import gan


def get_config(arg=None):
    arg = configlib.parse_arg(arg, tiny=False, hd=False, seg=False, steps=3000)
    c = configlib.base_config()

    condition = "seg" if arg.seg else "edges"
    c.data.name = "shapes"
    c.data.shapes_config = "32"
    c.data.image_size = 32
    c.data.batch_size = 16
    c.data.fields = ("image", gan.CONDITION_SOURCES[condition])

    if arg.hd:
        c.model = pix2pix.pix2pixhd_config()
        c.model.generator.update(base_channels=32, num_downsampling=2, num_res_blocks=3)
        c.model.discriminator.update(num_scales=2, base_channels=32, num_layers=2)
    else:
        c.model = pix2pix.default_config()
        c.model.generator.update(base_channels=32, num_downs=5)  # 32 px down to 1 x 1
        c.model.discriminator.update(base_channels=32, num_layers=2)

    c.task = gan.default_config()
    c.task.name = "pix2pix"
    c.task.condition = condition
    if arg.hd:
        c.task.gan_loss = "lsgan"
        c.task.l1_weight = 0.0
        c.task.feature_matching_weight = 10.0
    else:
        c.task.gan_loss = "nonsaturating"
        c.task.l1_weight = 100.0

    for network in ("generator", "discriminator"):
        c.optimizers[network] = gan.adam(2e-4, 0.5, 0.999)

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
        c.model = pix2pix.tiny_hd_config() if arg.hd else pix2pix.tiny_config()
        # Its small first and last convs cannot all be split 8 ways over fsdp.
        c.sharding.max_replicated_fraction = 0.2
        configlib.tiny_trainer(c.trainer, 2)
    return c

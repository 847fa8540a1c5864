"""SPADE (GauGAN) on Cityscapes as released: label-id maps -> street scenes.

Launch, with `root` holding the unpacked leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip:

  python -m genctl_jax.train --config configs/cityscapes_spade.py:root=/data/cityscapes \
      --workdir runs/cityscapes_spade

Data: the folder format with paired maps (data/folder.py). Each image
  ROOT/leftImg8bit/train/CITY/CITY_SEQ_FRAME_leftImg8bit.png
pairs with its label ids
  ROOT/gtFine/train/CITY/CITY_SEQ_FRAME_gtFine_labelIds.png
(the `_color` and `_instanceIds` files beside them are ignored). Ids 0..33 of the 34 Cityscapes
labels; 35 classes as GauGAN counts them. A missing label map, a map of another size than its
image, or a colour map where ids belong are errors naming the files.

Recipe (Park et al. 2019): the GauGAN generator at 256 px (base 64, SPADE hidden 128, 'normal'
up-sampling), two-scale discriminator, hinge loss, feature matching 10, Adam with betas
(0, 0.999), generator 1e-4 and discriminator 4e-4 (TTUR), 200 epochs of the 2,975 training
images. Our pipeline makes squares: random squares of 71-100 % of the frame's height, anywhere
across its width, resized to 256 px and flipped at random (GauGAN trains whole 256 x 512
frames). Not here: the VGG perceptual loss, spectral norm and the instance-edge input.

Variants (comma-separated after a colon):
  root=DIR   the Cityscapes root (default /data/cityscapes).
  vae        the VAE style encoder (KL 0.05) for multi-modal outputs.
  res=N      image side (a multiple of 32).
  steps=N    train steps (default: 200 epochs at batch 16).
  tiny       tests: tiny networks on the embedded shapes data's segmentation maps (32 px).
"""

from genctl_jax import configlib
from genctl_jax.data import shapes
from genctl_jax.models.gan import spade
from genctl_jax.trainers import gan

NUM_CLASSES = 35
TRAIN_IMAGES = 2975


def get_config(arg=None):
    arg = configlib.parse_arg(arg, root="/data/cityscapes", vae=False, res=256, steps=0, tiny=False)
    c = configlib.base_config()

    if not arg.tiny:
        c.data.name = f"folder:{arg.root}/leftImg8bit/train"
        c.data.folder_maps.segmentation = f"{arg.root}/gtFine/train"
        c.data.folder_suffixes.image = "_leftImg8bit"
        c.data.folder_suffixes.segmentation = "_gtFine_labelIds"
    c.data.image_size = arg.res
    c.data.batch_size = 16
    c.data.random_crop = (0.5, 1.0)  # area of the largest square: sides of 71-100 % of it
    c.data.random_flip = True
    c.data.fields = ("image", "segmentation")

    c.model = spade.default_config()
    c.model.generator.update(num_classes=NUM_CLASSES, use_vae=arg.vae)

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

    c.trainer.num_train_steps = arg.steps or 200 * TRAIN_IMAGES // c.data.batch_size
    c.trainer.ema_decay = 0.999
    c.trainer.log_every = 100
    c.trainer.checkpoint_every = 5000
    c.trainer.sample_every = 5000
    c.trainer.num_samples = 8

    if arg.tiny:
        c.data.name = "shapes"  # base_config's default, as the folder fields
        c.data.shapes_config = "tiny32"
        c.data.image_size = 32
        c.data.batch_size = 8
        c.data.random_crop = None
        c.model = spade.tiny_config(use_vae=arg.vae)
        c.model.generator.num_classes = 1 + shapes.NUM_SHAPES
        c.sharding.max_replicated_fraction = 0.3  # tiny widths do not split 8 ways
        configlib.tiny_trainer(c.trainer, 2)
    return c

"""Text-to-image with a frozen pretrained T5 encoder (Imagen's choice), from a local directory.

Launch (the directory holds the Hugging Face files of e.g. google/t5-v1_1-xl: config.json,
model.safetensors or a sharded index, and the tokenizer; nothing is downloaded):

  python -m genctl_jax.train --config configs/t2i_t5.py:encoder=/models/t5-v1_1-xl \
      --workdir runs/t2i_t5

Encode the captions once instead of running the encoder every step:

  python -m genctl_jax.encode_text --config configs/t2i_t5.py:encoder=/models/t5-v1_1-xl \
      --out /data/shapes_t5_cache
  python -m genctl_jax.train \
      --config configs/t2i_t5.py:encoder=/models/t5-v1_1-xl,cache=/data/shapes_t5_cache \
      --workdir runs/t2i_t5

Variants: `data=shapes` (default) or a `config.data.name` such as `folder:/data/images` (with
captions.jsonl), `res=64`, `cache=DIR`, `tiny` (tests). The UNet's context width is read
from the encoder's config.json. Shard a large encoder with `--config.mesh.fsdp=N`.
"""

from pathlib import Path

import ml_collections

from genctl_jax import configlib
from genctl_jax.diffusion import samplers, schedules
from genctl_jax.models import text, unet
from genctl_jax.trainers import optim

XL_WIDTHS = (2048, 2048)  # t5-v1_1-xl's (hidden, pooled) widths, until a directory is given.


def text_to_image_config(
    arg, encoder: str, max_length: int, default_widths: tuple[int, int]
) -> ml_collections.ConfigDict:
    """The config shared by the pretrained-encoder recipes (t2i_t5.py, t2i_clip.py)."""
    c = configlib.base_config()
    c.data.name = arg.data
    c.data.image_size = arg.res
    c.data.batch_size = 64
    c.data.random_flip = False  # prompts may name left and right
    c.data.fields = ("image", "caption", "index") if arg.cache else ("image", "caption")

    c.text = text.default_config()
    c.text.encoder = encoder
    c.text.pretrained = arg.encoder
    c.text.max_length = max_length
    c.text.trainable = False
    c.text.cache_dir = arg.cache

    hidden, pooled = default_widths
    if arg.encoder and Path(arg.encoder).expanduser().is_dir():
        built = text.build(c.text)  # reads only the directory's config.json
        hidden, pooled = built.hidden_size, built.pooled_size
    c.model = unet.default_config()
    c.model.channels = 128
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.attention_resolutions = (32, 16, 8)
    c.model.context_dim = hidden
    c.model.pooled_dim = pooled

    c.diffusion = schedules.default_config()
    c.diffusion.schedule = "cosine"
    c.diffusion.prediction_type = "v"
    c.diffusion.loss_weighting = "min_snr"

    c.sampling = samplers.default_config()
    c.sampling.num_steps = 50
    c.sampling.guidance_scale = 5.0

    c.task.name = "text_to_image"
    c.task.cond_drop_prob = 0.1

    c.optimizers.model = optim.default_config(
        name="adamw", learning_rate=1e-4, warmup_steps=1000, schedule="constant"
    )
    c.trainer.num_train_steps = 200_000
    c.trainer.ema_decay = 0.9999
    c.trainer.checkpoint_every = 5000
    c.trainer.sample_every = 5000

    if arg.tiny:
        c.data.name = "shapes"
        c.data.shapes_config = "tiny16"
        c.data.image_size = 16
        c.data.batch_size = 16
        c.text.max_length = 12  # the shapes captions are at most 10 tokens
        c.model = unet.tiny_config()
        c.model.num_classes = 0
        c.model.context_dim = hidden
        c.model.pooled_dim = pooled
        c.sampling.num_steps = 4
        c.optimizers.model.warmup_steps = 2
        c.trainer.num_train_steps = 2
        c.trainer.log_every = 1
        c.trainer.checkpoint_every = 2
        c.trainer.sample_every = 0
        c.trainer.progress_bar = False
        c.sharding.max_replicated_fraction = 0.5  # tiny widths do not split 8 ways
    return c


def get_config(arg=None):
    arg = configlib.parse_arg(arg, encoder="", data="shapes", res=64, cache="", tiny=False)
    return text_to_image_config(arg, "t5", 64, XL_WIDTHS)

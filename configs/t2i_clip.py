"""Text-to-image with a frozen pretrained CLIP text encoder (Stable Diffusion 1.x's choice).

Launch (the directory holds the Hugging Face files of e.g. openai/clip-vit-large-patch14:
config.json, model.safetensors and the tokenizer; nothing is downloaded):

  python -m genctl_jax.train --config configs/t2i_clip.py:encoder=/models/clip-vit-large-patch14 \
      --workdir runs/t2i_clip

The UNet attends to the last hidden states (77 tokens) and adds the projected pooled
embedding to its time embedding. Variants and the text cache as in `configs/t2i_t5.py`;
`--config.text.output=penultimate` takes SD 2.x's penultimate layer instead.
"""

import importlib.util
from pathlib import Path

from genctl_jax import configlib

# The recipe is t2i_t5.py's with another encoder (config files are loaded by path).
_spec = importlib.util.spec_from_file_location("t2i_t5", Path(__file__).with_name("t2i_t5.py"))
t2i_t5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(t2i_t5)

LARGE_WIDTHS = (768, 768)  # clip-vit-large-patch14: hidden size, projection size.


def get_config(arg=None):
    arg = configlib.parse_arg(arg, encoder="", data="shapes", res=64, cache="", tiny=False)
    return t2i_t5.text_to_image_config(arg, "clip", 77, LARGE_WIDTHS)

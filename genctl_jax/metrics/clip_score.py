"""CLIP score: how well images match their prompts, judged by a pretrained CLIP.

Convention: for the pair (image i, prompt i),

    score_i = 100 * max(cos(image_embeds_i, text_embeds_i), 0)

with the projected CLIP embeddings, and the CLIP score of a set of pairs is the mean of the
score_i. This is Hessel et al.'s (2021) CLIP-S, clamped per pair, with the weight w = 100
that torchmetrics' `CLIPScore` and most text-to-image papers report (Hessel et al. use
w = 2.5). torchmetrics clamps the mean instead, max(mean_i 100 cos_i, 0): the two agree
unless some pair has cos < 0, which a real CLIP rarely gives a prompt and its image;
`cosine_similarity` returns the raw cosines for either convention.

Images are ours (NHWC float in [-1, 1], any size); `CLIPPreprocessing` resizes, crops and
normalises them inside jit (see its docstring for the bound on its difference from
transformers' PIL-based `CLIPImageProcessor`). Prompts are tokenised with the checkpoint's
tokenizer (`genctl_jax.models.text.tokenizer`), padded to the text tower's length.

`clip_scores` is the pure, jittable function; `CLIPScorer` loads a transformers `CLIPModel`
directory (config.json, model.safetensors, tokenizer and preprocessor_config.json files)
and runs one jitted scoring function whose batch is split over the mesh's batch axes
(`data`, `fsdp`), padding a batch that does not divide evenly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from genctl_jax import configlib
from genctl_jax.models import clip_vision
from genctl_jax.models.clip_vision import CLIPModel, CLIPPreprocessing
from genctl_jax.parallel import sharding
from genctl_jax.parallel.mesh import BATCH_AXES

SCALE = 100.0  # w of CLIP-S.


def cosine_similarity(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """[B] cosine of each row pair of [B, P] embeddings, in float32."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(
            f"image_embeds {image_embeds.shape} and text_embeds {text_embeds.shape}: expected "
            f"two [batch, dim] arrays of the same shape (one prompt per image)"
        )
    image = clip_vision.normalize(image_embeds)
    text = clip_vision.normalize(text_embeds)
    return jnp.sum(image * text, axis=-1)


def pair_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
    """[B] CLIP scores 100 * max(cos, 0) of [B, P] image and text embeddings (any norm)."""
    return SCALE * jnp.maximum(cosine_similarity(image_embeds, text_embeds), 0.0)


def clip_scores(
    model: CLIPModel,
    params: Any,
    preprocessing: CLIPPreprocessing,
    images: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
    """[B] per-pair CLIP scores of images [B, H, W, C] in [-1, 1] and their prompts' ids [B, L].

    Jittable (close over `model` and `preprocessing`); with batch-sharded inputs under a
    mesh, the result is sharded the same way.
    """
    if images.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"{images.shape[0]} images and {input_ids.shape[0]} prompts: expected one prompt "
            f"per image"
        )
    variables = {"params": params}
    pixels = preprocessing(images)
    image_embeds = model.apply(variables, pixels, method=CLIPModel.get_image_features)
    text_embeds = model.apply(
        variables, input_ids, attention_mask, method=CLIPModel.get_text_features
    )
    return pair_scores(image_embeds, text_embeds)


class CLIPScorer:
    """A CLIP, its preprocessing and tokenizer, and one jitted per-pair scoring function.

    Scores do not depend on how the batch is split: every row is scored on its own. Inputs
    may be host arrays holding the whole batch, or global `jax.Array`s already split over
    the batch axes (multi-host; there the batch must divide over them, as host arrays are
    what gets padded).
    """

    def __init__(
        self,
        model: CLIPModel,
        params: Any,
        preprocessing: CLIPPreprocessing | None = None,
        tokenizer: Any = None,
        mesh: jax.sharding.Mesh | None = None,
        rules: Any = None,
    ):
        """params: `model`'s `params`; tokenizer: a tokenizer, or a directory to load one from
        when first needed (only `score`, which takes prompt strings, needs it).

        With a mesh, params are placed by their logical names under `rules` (default:
        DEFAULT_RULES; nothing moves if they already are) and batches split over
        ('data', 'fsdp').
        """
        self.model = model
        self.preprocessing = preprocessing or CLIPPreprocessing.for_image_size(
            model.config.vision.image_size
        )
        self.preprocessing.check_matches(model.config.vision)
        self.tokenizer, self._tokenizer_source = tokenizer, None
        if isinstance(tokenizer, (str, Path)):
            self.tokenizer, self._tokenizer_source = None, tokenizer
        self.mesh = mesh
        self.rules = configlib.DEFAULT_RULES if rules is None else rules
        self.max_length = model.config.text.max_position_embeddings

        def score(params, images, input_ids, attention_mask):
            return clip_scores(model, params, self.preprocessing, images, input_ids, attention_mask)

        if mesh is None:
            self.params = params
            self.batch_multiple = 1
            self._score = jax.jit(score)
            return
        config = model.config
        ids = jnp.zeros((1, self.max_length), jnp.int32)
        pixels = clip_vision.example_pixels(config.vision)
        boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), pixels, ids))["params"]
        param_shardings = sharding.logical_to_shardings(boxed, mesh, self.rules, "clip_score")
        self.params = jax.device_put(nn.unbox(params), param_shardings)
        self.batch_multiple = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
        self._batch = NamedSharding(mesh, PartitionSpec(tuple(BATCH_AXES)))
        self._score = jax.jit(
            score,
            in_shardings=(param_shardings, self._batch, self._batch, self._batch),
            out_shardings=self._batch,
        )

    @classmethod
    def load(
        cls,
        directory: str | Path,
        *,
        mesh: jax.sharding.Mesh | None = None,
        rules: Any = None,
        dtype: Any = jnp.float32,
        tokenizer_directory: str | Path | None = None,
    ) -> CLIPScorer:
        """From a transformers `CLIPModel` directory (or a repo id in the local HF cache).

        The tokenizer is loaded from `tokenizer_directory` (default: `directory`) when first
        needed; preprocessing comes from preprocessor_config.json, else OpenAI's defaults.
        """
        model, params = clip_vision.load_pretrained(directory, dtype=dtype, mesh=mesh, rules=rules)
        preprocessing = clip_vision.load_preprocessing(directory, model.config.vision)
        tokenizer = tokenizer_directory or directory
        return cls(model, params, preprocessing, tokenizer, mesh, rules)

    def tokenize(self, prompts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 [B, max_length] of prompts, with this CLIP's tokenizer."""
        from genctl_jax.models.text import tokenizer as tokenizer_lib

        if self.tokenizer is None:
            if self._tokenizer_source is None:
                raise ValueError(
                    "this CLIPScorer has no tokenizer: pass tokenizer= (or use "
                    "CLIPScorer.load), or call pair_scores with token ids"
                )
            self.tokenizer = tokenizer_lib.load_tokenizer(self._tokenizer_source)
            tokenizer_lib.check_vocab(self.tokenizer, self.model.config.text.vocab_size, "clip")
        return tokenizer_lib.tokenize(self.tokenizer, prompts, self.max_length)

    def pair_scores(self, images: Any, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """[B] float32 scores 100 * max(cos, 0) of images [B, H, W, C] in [-1, 1] and ids [B, L]."""
        n = images.shape[0]
        if input_ids.shape != (n, self.max_length):
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} for {n} images: expected "
                f"[{n}, {self.max_length}] (tokenize with max_length={self.max_length})"
            )
        if attention_mask is None:
            attention_mask = np.ones(input_ids.shape, np.int32)
        inputs = (images, input_ids, attention_mask)
        pad = -n % self.batch_multiple
        if pad:  # Repeat the last row; its copies are scored and dropped.
            inputs = tuple(
                np.concatenate([np.asarray(a), np.repeat(np.asarray(a)[-1:], pad, 0)])
                for a in inputs
            )
        if self.mesh is None:
            scores = self._score(self.params, *inputs)
        else:
            inputs = tuple(jax.device_put(a, self._batch) for a in inputs)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                scores = self._score(self.params, *inputs)
        return np.asarray(scores)[:n]

    def score(self, images: Any, prompts: Sequence[str]) -> float:
        """The CLIP score (mean of `pair_scores`) of images and one prompt per image."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"{images.shape[0]} images and {len(prompts)} prompts: expected one prompt "
                f"per image"
            )
        ids, mask = self.tokenize(prompts)
        return float(self.pair_scores(images, ids, mask).mean())

"""Text-to-image diffusion: a cross-attention UNet conditioned on a T5 or CLIP text encoder.

Networks: `model` (the UNet) and, unless the run reads precomputed embeddings
(`config.text.cache_dir`), `text_encoder`, trained jointly (`config.text.trainable`) or
frozen with weights from `config.text.pretrained`. Captions are tokenised on the host
(`prepare_batch`); with a cache, the host reads each example's embedding by its index.

Guidance. With probability `config.task.cond_drop_prob` an example's prompt is replaced by
the empty prompt (its token ids, or its cached embedding), so the model also learns
p(x | ""); sampling runs the prompt and the empty (or a negative) prompt in one batched
forward and combines them with `config.sampling.guidance_scale`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genctl_jax.data import text_cache
from genctl_jax.diffusion import samplers
from genctl_jax.errors import ConfigError
from genctl_jax.models import text as text_lib
from genctl_jax.models.text import tokenizer as tokenizer_lib
from genctl_jax.trainers.diffusion import DiffusionTask
from genctl_jax.trainers.task import Phase


class TextToImageTask(DiffusionTask):
    """Diffusion training and guided sampling of a UNet conditioned on prompts."""

    def __init__(self, config: ml_collections.ConfigDict):
        super().__init__(config)
        self.text_config = config.text
        self.max_length = config.text.max_length
        self.encoder = text_lib.build(config.text, jnp.dtype(config.model.dtype))
        self.cache = None
        if config.text.cache_dir:
            self.cache = text_cache.TextCache(config.text.cache_dir)

    # ---- Text.

    @functools.cached_property
    def tokenizer(self):
        return text_lib.load_tokenizer(self.text_config)

    def tokenize(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        return tokenizer_lib.tokenize(self.tokenizer, prompts, self.max_length)

    @functools.cached_property
    def empty_prompt(self) -> dict[str, np.ndarray]:
        """The condition dropout replaces a prompt with: one row, without a batch axis."""
        if self.cache is not None:
            return dict(self.cache.empty)
        ids, mask = self.tokenize([""])
        return {"input_ids": ids[0], "attention_mask": mask[0]}

    def encode(self, params, ids, mask) -> dict[str, jax.Array]:
        """Token ids [B, L] -> the UNet's conditioning (hidden, mask, pooled)."""
        hidden, pooled = self.encoder.module.apply({"params": params["text_encoder"]}, ids, mask)
        return {"hidden": hidden, "mask": mask, "pooled": pooled}

    def _unet(self, params, x, t, cond, **kwargs):
        pooled = cond["pooled"] if self.text_config.use_pooled else None
        return self.model.apply(
            {"params": params["model"]},
            x,
            t,
            context=cond["hidden"],
            context_mask=cond["mask"],
            pooled=pooled,
            **kwargs,
        )

    # ---- Task API.

    def init_params(self, rng, batch):
        image = jnp.zeros((1,) + tuple(batch["image"].shape[1:]), jnp.float32)
        t = jnp.zeros((1,), jnp.int32)
        length = self.max_length
        cond = {
            "hidden": jnp.zeros((1, length, self.encoder.hidden_size), jnp.float32),
            "mask": jnp.ones((1, length), jnp.int32),
            "pooled": jnp.zeros((1, self.encoder.pooled_size), jnp.float32),
        }
        k_model, k_text = jax.random.split(rng)
        pooled = cond["pooled"] if self.text_config.use_pooled else None
        params = {
            "model": self.model.init(
                k_model, image, t, context=cond["hidden"], context_mask=cond["mask"], pooled=pooled
            )["params"]
        }
        if self.cache is None:
            ids = jnp.zeros((1, length), jnp.int32)
            params["text_encoder"] = self.encoder.module.init(k_text, ids, ids)["params"]
        return params

    @property
    def phases(self):
        trained = ("model", "text_encoder") if self._encoder_trained else ("model",)
        return (Phase("denoise", trained, self.loss),)

    @property
    def _encoder_trained(self) -> bool:
        return self.cache is None and self.text_config.trainable

    def pretrained_params(self, shardings):
        if self.cache is not None or not self.text_config.pretrained:
            return {}
        return {
            "text_encoder": text_lib.load_pretrained_params(
                self.encoder, self.text_config, shardings["text_encoder"]
            )
        }

    def prepare_batch(self, batch):
        batch = dict(batch)
        if self.cache is not None:
            rows = self.cache.read(batch["index"])
            batch.update(text_hidden=rows["hidden"], text_mask=rows["mask"])
            batch["text_pooled"] = rows["pooled"]
        else:
            ids, mask = self.tokenize([str(c) for c in batch["caption"]])
            batch.update(input_ids=ids, attention_mask=mask)
        return batch

    def _batch_condition(self, params, batch, drop=None):
        """The batch's conditioning, with rows where `drop` is True set to the empty prompt."""
        empty = {k: jnp.asarray(v) for k, v in self.empty_prompt.items()}

        def where(value, empty_row):
            if drop is None:
                return value
            return jnp.where(drop.reshape((-1,) + (1,) * (value.ndim - 1)), empty_row, value)

        if self.cache is not None:
            return {
                "hidden": where(batch["text_hidden"], empty["hidden"]),
                "mask": where(batch["text_mask"], empty["mask"].astype(jnp.int32)),
                "pooled": where(batch["text_pooled"], empty["pooled"]),
            }
        ids = where(batch["input_ids"], empty["input_ids"])
        mask = where(batch["attention_mask"], empty["attention_mask"])
        return self.encode(params, ids, mask)

    def loss(self, params, batch, rng, step):
        del step
        x0 = batch["image"]
        n = x0.shape[0]
        k_t, k_noise, k_drop, k_dropout = jax.random.split(rng, 4)
        drop = jax.random.bernoulli(k_drop, self.config.task.cond_drop_prob, (n,))
        cond = self._batch_condition(params, batch, drop)
        return self.denoising_loss(
            x0,
            k_t,
            k_noise,
            lambda x_t, t: self._unet(
                params, x_t, t, cond, train=True, rngs={"dropout": k_dropout}
            ),
        )

    def generate_from_condition(self, params, rng, cond, uncond, num_samples, options):
        """Images in [-1, 1] for conditioning pytrees with a leading batch of num_samples."""

        def model_fn(x, t, c):
            return self._unet(params, x, t, c)

        shape = (num_samples, *self.image_shape)
        x0 = samplers.sample(model_fn, self.schedule, rng, shape, options, cond, uncond)
        return jnp.clip(x0, -1.0, 1.0)

    def generate_from_tokens(self, params, rng, prompt, negative, num_samples, options):
        """`prompt`/`negative`: (ids, mask) [N, L] each; needs the encoder's params."""
        cond = self.encode(params, *prompt)
        uncond = self.encode(params, *negative)
        return self.generate_from_condition(params, rng, cond, uncond, num_samples, options)

    def sample(self, params, rng, batch):
        """The periodic grid: the first `trainer.num_samples` prompts of the sample batch."""
        n = self.config.trainer.num_samples
        head = jax.tree.map(lambda x: x[:n], batch)
        cond = self._batch_condition(params, head)
        uncond = self._batch_condition(params, head, jnp.ones((n,), bool))
        return self.generate_from_condition(params, rng, cond, uncond, n, self.sampling)

    @classmethod
    def validate(cls, config):
        super().validate(config)
        t, m = config.text, config.model
        if m.num_classes:
            raise ConfigError(
                f"config.model.num_classes={m.num_classes}: a text-to-image model is conditioned "
                f"on prompts; set num_classes=0"
            )
        need = "index" if t.cache_dir else "caption"
        if need not in config.data.fields:
            raise ConfigError(
                f"config.data.fields={tuple(config.data.fields)!r} lacks {need!r}, which "
                f"text-to-image training reads (captions, or with a cache the example index)"
            )
        if t.cache_dir and not t.pretrained:
            raise ConfigError(
                "config.text.cache_dir is set but config.text.pretrained is '': a cache holds a "
                "frozen pretrained encoder's embeddings; set pretrained to its directory"
            )
        if t.cache_dir and t.trainable:
            raise ConfigError(
                "config.text.cache_dir is set with config.text.trainable=True: cached embeddings "
                "cannot train the encoder; set trainable=False or cache_dir=''"
            )
        if not t.pretrained and not t.trainable:
            raise ConfigError(
                "config.text.pretrained is '' and config.text.trainable=False: a randomly "
                "initialised encoder must train; set trainable=True or give pretrained weights"
            )
        if not isinstance(t.max_length, int) or t.max_length < 1:
            raise ConfigError(f"config.text.max_length={t.max_length!r}: expected an int >= 1")
        encoder = text_lib.build(t)
        if encoder.max_positions is not None and t.max_length > encoder.max_positions:
            raise ConfigError(
                f"config.text.max_length={t.max_length}, but the {t.encoder} encoder has "
                f"{encoder.max_positions} positions; set max_length <= {encoder.max_positions}"
            )
        if m.context_dim != encoder.hidden_size:
            raise ConfigError(
                f"config.model.context_dim={m.context_dim}, but the {t.encoder} encoder's hidden "
                f"size is {encoder.hidden_size}; set context_dim={encoder.hidden_size}"
            )
        pooled = encoder.pooled_size if t.use_pooled else 0
        if m.pooled_dim != pooled:
            raise ConfigError(
                f"config.model.pooled_dim={m.pooled_dim}, but config.text.use_pooled="
                f"{t.use_pooled} with a pooled size of {encoder.pooled_size}; set pooled_dim="
                f"{pooled}"
            )
        tokenizer_lib.check_vocab(
            text_lib.load_tokenizer(t), encoder.vocab_size, "config.text.tokenizer"
        )
        if t.cache_dir:
            text_cache.TextCache(t.cache_dir).check(config, config.data.split)

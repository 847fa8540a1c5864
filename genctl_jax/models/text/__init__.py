"""Text encoders (T5, CLIP) in Flax linen, built from Hugging Face configs and weights.

Each encoder maps (input_ids [B, L], attention_mask [B, L]) to (hidden [B, L, D],
pooled [B, P]); a text-conditioned UNet attends to `hidden` and adds `pooled` to its time
embedding. `config.text` says which encoder, where its weights and tokenizer come from,
and whether it trains with the UNet or stays frozen.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from genctl_jax.errors import ConfigError
from genctl_jax.io import hf_weights

ENCODERS = ("t5", "clip")


def default_config() -> ml_collections.ConfigDict:
    """The `config.text` block (one line per field)."""
    t = ml_collections.ConfigDict()
    t.encoder = "t5"  # One of ENCODERS.
    # Local Hugging Face directory (or a repo id in the local HF cache) holding config.json,
    # safetensors weights and the tokenizer; '' = random init from `hf_config`.
    t.pretrained = ""
    t.hf_config = ml_collections.ConfigDict()  # config.json fields of a randomly initialised one.
    # '' = the tokenizer saved in `pretrained`; 'shapes' = the shapes captions' word vocabulary;
    # else a local directory with tokenizer files.
    t.tokenizer = ""
    t.max_length = 77  # Tokens per prompt (padded / truncated).
    t.trainable = False  # Train jointly with the UNet (optimizer: config.optimizers.text_encoder).
    t.output = "last"  # CLIP only: 'last' or 'penultimate' hidden states (SD 2.x / SDXL).
    t.use_pooled = True  # Add the pooled embedding to the UNet's time embedding.
    # Precomputed embeddings (`python -m genctl_jax.encode_text`); '' = encode every step.
    t.cache_dir = ""
    return t


@dataclasses.dataclass(frozen=True)
class TextEncoder:
    """An encoder module with the facts the rest of the code needs about it."""

    module: nn.Module
    hf_config: dict[str, Any]  # Its Hugging Face config.json.
    weight_map: list[hf_weights.Tensor]  # Flax params <-> checkpoint tensors.
    hidden_size: int  # D of the hidden states (the UNet's context_dim).
    pooled_size: int  # P of the pooled embedding (the UNet's pooled_dim).
    vocab_size: int
    max_positions: int | None  # Longest token sequence it takes (None: any, T5's relative bias).

    def abstract_params(self, max_length: int) -> Any:
        """Boxed `params` shapes (with logical names), without allocating anything."""
        ids = jnp.zeros((1, max_length), jnp.int32)
        return jax.eval_shape(lambda: self.module.init(jax.random.key(0), ids, ids))["params"]


def hf_config_of(text_config: ml_collections.ConfigDict) -> dict[str, Any]:
    if text_config.pretrained:
        return hf_weights.read_config(text_config.pretrained)
    return text_config.hf_config.to_dict()


def build(text_config: ml_collections.ConfigDict, dtype: Any = jnp.float32) -> TextEncoder:
    """The encoder of `config.text` (its config.json is read when `pretrained` is set)."""
    if text_config.encoder not in ENCODERS:
        raise ConfigError(
            f"config.text.encoder={text_config.encoder!r}: expected one of {', '.join(ENCODERS)}"
        )
    hf = hf_config_of(text_config)
    if text_config.encoder == "t5":
        from genctl_jax.models.text import t5

        cfg = t5.T5Config.from_hf(hf)
        module = t5.T5Encoder(config=cfg, dtype=dtype)
        return TextEncoder(
            module, hf, t5.weight_map(cfg), cfg.d_model, cfg.d_model, cfg.vocab_size, None
        )
    from genctl_jax.models.text import clip

    if text_config.output not in ("last", "penultimate"):
        raise ConfigError(
            f"config.text.output={text_config.output!r}: expected 'last' or 'penultimate'"
        )
    cfg = clip.CLIPTextConfig.from_hf(hf)
    module = clip.CLIPTextEncoder(config=cfg, output=text_config.output, dtype=dtype)
    pooled = cfg.projection_dim if cfg.with_projection else cfg.hidden_size
    return TextEncoder(
        module,
        hf,
        clip.weight_map(cfg),
        cfg.hidden_size,
        pooled,
        cfg.vocab_size,
        cfg.max_position_embeddings,
    )


def load_tokenizer(text_config: ml_collections.ConfigDict):
    from genctl_jax.models.text import tokenizer

    if text_config.tokenizer == "shapes":
        return tokenizer.shapes_tokenizer()
    source = text_config.tokenizer or text_config.pretrained
    if not source:
        raise ConfigError(
            "config.text.tokenizer is '' and config.text.pretrained is '': name a tokenizer "
            "directory, 'shapes', or a pretrained encoder directory that holds one"
        )
    return tokenizer.load_tokenizer(source)


def load_pretrained_params(
    encoder: TextEncoder, text_config: ml_collections.ConfigDict, shardings: Any = None
) -> Any:
    """The encoder's weights from `config.text.pretrained`, placed by `shardings` if given."""
    abstract = nn.unbox(encoder.abstract_params(text_config.max_length))
    checkpoint = hf_weights.open_checkpoint(text_config.pretrained)
    return hf_weights.import_params(
        encoder.weight_map, checkpoint, abstract, shardings, source=text_config.pretrained
    )

"""CLIP's text transformer in Flax linen, with Hugging Face `transformers` weights.

Matches `transformers.CLIPTextModel` and `CLIPTextModelWithProjection` (and the text tower
of a full `CLIPModel`), the text encoders of Stable Diffusion 1.x (OpenAI ViT-L/14), 2.x
(OpenCLIP ViT-H) and SDXL (both):

    x = token_embedding[ids] + position_embedding[:L]        learned absolute positions
    for each layer (pre-LN):
        x += out_proj(attention(layer_norm1(x)))              causal AND padding mask;
                                                              q/k/v/out with biases
        x += fc2(act(fc1(layer_norm2(x))))                    quick_gelu or exact gelu
    last = final_layer_norm(x)
    pooled = last[EOS position]  (-> text_projection, no bias, when the model has one)

The EOS position follows transformers: configs written before transformers#24773 carry
`eos_token_id == 2`, and for them the pooled token is the one with the largest id (OpenAI's
EOS is the last id of its vocabulary); otherwise it is the first `eos_token_id` in the row.

`output` picks the per-token states returned as `hidden`:
  'last'         `last_hidden_state`: the final layer's output after `final_layer_norm`.
  'penultimate'  `hidden_states[-2]`: the residual stream entering the last layer, with NO
                 final layer norm (transformers' CLIP does not tie its last hidden state to
                 the normed one). SDXL conditions on exactly this; diffusers' `clip_skip`
                 applies `final_layer_norm` to it itself.
`pooled` always comes from the full stack, as SDXL uses it.

Numerics: params float32; the residual stream, layer norms and softmax run in float32 and
the matmuls in `dtype`. Sharding: kernels are named ('embed', 'heads', 'head_dim'),
('embed', 'mlp'), the token table ('vocab', 'embed'), so `fsdp` shards the width and
`tensor` splits heads, the MLP and the vocabulary.

Checkpoint keys are those of `CLIPTextModelWithProjection` / `CLIPModel` and of every Hub
`CLIPTextModel` (`text_model.embeddings.token_embedding.weight`, ...,
`text_projection.weight`). transformers 5 saves a `CLIPTextModel` without the `text_model.`
prefix; both are read, and `save_pretrained` writes the prefixed layout, which all
transformers versions load.

The vision tower and the full two-tower CLIP (`genctl_jax.models.clip_vision`) reuse
`EncoderLayer` (with `causal=False`), `layer_norm` and `encoder_layers_weight_map`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from genctl_jax.errors import ConfigError
from genctl_jax.io import hf_weights
from genctl_jax.nn.attention import HEADS_ACTIVATION, OUT_AXES, QKV_AXES, MultiAxisDense
from genctl_jax.nn.layers import dense

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}
OUTPUTS = ("last", "penultimate")
# transformers' marker of a pre-#24773 config, whose pooling takes argmax(input_ids).
LEGACY_EOS_TOKEN_ID = 2
# [B, L, width] activations between layers.
ACTIVATION_AXES = ("batch", "length", "embed")
PREFIX = "text_model."
# The default width of a `text_projection` in transformers' CLIP configs.
HF_DEFAULT_PROJECTION_DIM = 512


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def tower_config_from_hf(cls, hf_config: Mapping[str, Any], tower: str, source: str):
    """`cls` (a tower's config dataclass with `projection_dim` and `with_projection`) from a
    `config.json`: a full `CLIPModel`'s ('clip'; the tower's section, which an old OpenAI
    `{tower}_config_dict` overrides; a projection of the top-level `projection_dim`) or a
    single tower's ('clip_{tower}_model'; a projection when its architecture is
    `CLIP{Tower}ModelWithProjection`). tower: 'text' or 'vision'."""
    model_type = hf_config.get("model_type")
    kind = f"CLIP{tower.capitalize()}Model"
    if model_type == "clip":
        fields = {**(hf_config.get(f"{tower}_config") or {})}
        fields.update(hf_config.get(f"{tower}_config_dict") or {})
        with_projection = True
        projection_dim = hf_config.get("projection_dim", HF_DEFAULT_PROJECTION_DIM)
    elif model_type == f"clip_{tower}_model":
        fields = dict(hf_config)
        with_projection = f"{kind}WithProjection" in (hf_config.get("architectures") or ())
        default = HF_DEFAULT_PROJECTION_DIM if with_projection else None
        projection_dim = fields.get("projection_dim", default)
    else:
        what = "text encoder" if tower == "text" else "vision model"
        raise ConfigError(
            f"{source}: model_type={model_type!r} is not a CLIP {what}; accepted: 'clip' "
            f"(CLIPModel) or 'clip_{tower}_model' ({kind}, {kind}WithProjection)"
        )
    own = {f.name for f in dataclasses.fields(cls)} - {"projection_dim", "with_projection"}
    try:
        return cls(
            **{k: v for k, v in fields.items() if k in own},
            projection_dim=projection_dim,
            with_projection=with_projection,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower's shape (transformers' `CLIPTextConfig` names; defaults are its defaults)."""

    vocab_size: int = 49408  # Rows of the token embedding table.
    hidden_size: int = 512  # Model width.
    intermediate_size: int = 2048  # Hidden width of each layer's MLP.
    num_hidden_layers: int = 12  # Transformer layers.
    num_attention_heads: int = 8  # Heads; must divide hidden_size.
    max_position_embeddings: int = 77  # Learned positions: the longest input.
    hidden_act: str = "quick_gelu"  # MLP activation, a key of ACTIVATIONS.
    layer_norm_eps: float = 1e-5  # Epsilon of every layer norm.
    bos_token_id: int = 49406  # Start-of-text id (recorded for export; unused in the forward).
    eos_token_id: int = 49407  # The pooled token's id; 2 selects the legacy argmax rule.
    pad_token_id: int = 1  # Padding id (recorded for export; the mask marks padding).
    projection_dim: int | None = None  # Width of text_projection (needed with_projection).
    with_projection: bool = False  # pooled = text_projection(EOS state), as text_embeds.

    def __post_init__(self):
        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"CLIPTextConfig.{name}={value!r}: expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPTextConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose a divisor of it"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"CLIPTextConfig.hidden_act={self.hidden_act!r} is not supported; accepted: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ConfigError(
                f"CLIPTextConfig.eos_token_id={self.eos_token_id!r}: expected one integer id "
                f"(the pooled token)"
            )
        if self.with_projection and not (
            isinstance(self.projection_dim, int) and self.projection_dim >= 1
        ):
            raise ConfigError(
                f"CLIPTextConfig.projection_dim={self.projection_dim!r} with with_projection=True:"
                f" expected the positive width of text_projection"
            )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], source: str = "config.json") -> CLIPTextConfig:
        """From a `config.json` of a `CLIPModel` ('clip') or a CLIP text model ('clip_text_model').

        A full `CLIPModel` has a text projection (width from its top-level `projection_dim`);
        a 'clip_text_model' has one when its architecture is `CLIPTextModelWithProjection`.
        """
        return tower_config_from_hf(cls, hf_config, "text", source)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` that transformers loads as `CLIPTextModel(WithProjection)`."""
        fields = dataclasses.asdict(self)
        fields.pop("with_projection")
        if fields["projection_dim"] is None:
            fields.pop("projection_dim")
        architecture = "CLIPTextModelWithProjection" if self.with_projection else "CLIPTextModel"
        return {"architectures": [architecture], "model_type": "clip_text_model", **fields}


def tiny_config(**overrides: Any) -> CLIPTextConfig:
    """A 2-layer, 32-wide text tower for tests."""
    fields = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        bos_token_id=62,
        eos_token_id=63,
        pad_token_id=63,
    )
    return CLIPTextConfig(**{**fields, **overrides})


def layer_norm(epsilon: float, name: str) -> nn.LayerNorm:
    """LayerNorm in float32 with the two-pass variance (as torch computes it)."""
    return nn.LayerNorm(
        epsilon=epsilon,
        dtype=jnp.float32,
        use_fast_variance=False,
        scale_init=_logical(nn.initializers.ones_init(), ("vector",)),
        bias_init=_logical(nn.initializers.zeros_init(), ("vector",)),
        name=name,
    )


def eos_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """[B] index of the token whose final state is pooled (transformers' rule, see above)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1)
    # argmax returns the first maximum: the first EOS (padding often reuses the EOS id).
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1)


class SelfAttention(nn.Module):
    """Multi-head attention over the sequence, with q/k/v/out biases."""

    num_heads: int  # Heads; must divide the width.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the projections.
    causal: bool = True  # Each token attends only to itself and earlier ones (text tower).

    @nn.compact
    def __call__(self, x, mask):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        x = x.astype(self.dtype)

        def project(name):
            y = MultiAxisDense(
                (self.num_heads, head_dim),
                QKV_AXES,
                ("heads", "head_dim"),
                dtype=self.dtype,
                name=name,
            )(x)
            return nn.with_logical_constraint(y, HEADS_ACTIVATION)

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        # Logits and softmax run in float32 whatever the compute dtype (XLA implementation).
        a = jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=head_dim**-0.5, is_causal=self.causal
        )
        a = nn.with_logical_constraint(a, HEADS_ACTIVATION)
        return MultiAxisDense(
            (width,), OUT_AXES, ("vector",), num_in_axes=2, dtype=self.dtype, name="out_proj"
        )(a)


class MLP(nn.Module):
    """fc2(act(fc1(x))), with the hidden width named 'mlp'."""

    intermediate_size: int  # Hidden width.
    activation: str  # A key of ACTIVATIONS.
    dtype: jnp.dtype = jnp.float32  # Compute dtype.

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        h = MultiAxisDense(
            (self.intermediate_size,), ("embed", "mlp"), ("mlp",), dtype=self.dtype, name="fc1"
        )(x.astype(self.dtype))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        h = ACTIVATIONS[self.activation](h)
        return MultiAxisDense(
            (width,), ("mlp", "embed"), ("vector",), dtype=self.dtype, name="fc2"
        )(h)


class EncoderLayer(nn.Module):
    """One pre-LN transformer layer on the float32 residual stream (text and vision towers)."""

    # The tower's shape: a CLIPTextConfig, or any config with the same layer fields
    # (layer_norm_eps, num_attention_heads, intermediate_size, hidden_act), e.g. the vision one.
    config: Any
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the matmuls.
    causal: bool = True  # Causal self-attention (text); the vision tower attends both ways.

    @nn.compact
    def __call__(self, x, mask):
        c = self.config
        h = layer_norm(c.layer_norm_eps, "layer_norm1")(x)
        h = SelfAttention(c.num_attention_heads, self.dtype, self.causal, name="self_attn")(h, mask)
        x = x + h.astype(jnp.float32)
        h = layer_norm(c.layer_norm_eps, "layer_norm2")(x)
        h = MLP(c.intermediate_size, c.hidden_act, self.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x + h.astype(jnp.float32), ACTIVATION_AXES)


class CLIPTextEncoder(nn.Module):
    """(input_ids [B, L], attention_mask [B, L] or None) -> (hidden [B, L, D], pooled [B, P]).

    `hidden` is float32 [B, L, hidden_size] (see `output`); `pooled` is float32, the projected
    `text_embeds` [B, projection_dim] with a projection, else the final-LN'd EOS state
    (`pooler_output`) [B, hidden_size]. The mask is 1 for tokens and 0 for padding.
    """

    config: CLIPTextConfig  # The tower's shape.
    output: str = "last"  # Per-token states returned: one of OUTPUTS (module docstring).
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the matmuls; params stay float32.
    remat: bool = False  # Recompute each layer's activations in the backward pass.

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ConfigError(
                f"CLIPTextEncoder.output={self.output!r}: accepted: {', '.join(OUTPUTS)}"
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        batch, length = input_ids.shape
        if length > c.max_position_embeddings:
            raise ValueError(
                f"input of {length} tokens is longer than the encoder's "
                f"max_position_embeddings={c.max_position_embeddings}; tokenize with "
                f"max_length={c.max_position_embeddings}"
            )
        tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            embedding_init=_logical(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embedding",
        )(input_ids)
        positions = self.param(
            "position_embedding",
            _logical(nn.initializers.normal(0.01), ("length", "embed")),
            (c.max_position_embeddings, c.hidden_size),
        )
        x = nn.with_logical_constraint(tokens + positions[:length], ACTIVATION_AXES)

        # Padding masks keys; the causal part is `is_causal` in the attention.
        mask = None
        if attention_mask is not None:
            mask = (attention_mask > 0)[:, None, None, :]
        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        penultimate = x
        for i in range(c.num_hidden_layers):
            penultimate = x
            x = layer_cls(c, self.dtype, name=f"layers_{i}")(x, mask)
        last = layer_norm(c.layer_norm_eps, "final_layer_norm")(x)

        pooled = last[jnp.arange(batch), eos_positions(input_ids, c.eos_token_id)]
        if c.with_projection:
            # The projected width is split over `tensor`, like an MLP's hidden width.
            pooled = dense(
                c.projection_dim,
                ("embed", "mlp"),
                dtype=self.dtype,
                use_bias=False,
                name="text_projection",
            )(pooled)
        hidden = last if self.output == "last" else penultimate
        return hidden.astype(jnp.float32), pooled.astype(jnp.float32)


def weight_map(config: CLIPTextConfig) -> list[hf_weights.Tensor]:
    """Every Flax parameter of `CLIPTextEncoder(config)` and its transformers checkpoint key."""

    def tower(flax, key, kind="same", num_in_axes=1):
        # The text tower's keys, with or without the `text_model.` prefix (module docstring).
        return hf_weights.Tensor(flax, (PREFIX + key, key), kind, num_in_axes)

    out = [
        tower(("token_embedding", "embedding"), "embeddings.token_embedding.weight"),
        tower(("position_embedding",), "embeddings.position_embedding.weight"),
        tower(("final_layer_norm", "scale"), "final_layer_norm.weight"),
        tower(("final_layer_norm", "bias"), "final_layer_norm.bias"),
    ]
    out += encoder_layers_weight_map(config.num_hidden_layers, tower)
    if config.with_projection:
        out.append(
            hf_weights.Tensor(("text_projection", "kernel"), "text_projection.weight", "linear")
        )
    return out


def encoder_layers_weight_map(num_layers: int, tower) -> list[hf_weights.Tensor]:
    """The tensors of `EncoderLayer`s `layers_0..` <-> `encoder.layers.{i}.*` (either tower).

    tower(flax_path, key, kind='same', num_in_axes=1) -> Tensor adds the tower's prefixes.
    """
    out = []
    for i in range(num_layers):
        flax, hf = f"layers_{i}", f"encoder.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj"):
            key = f"{hf}.self_attn.{name}"
            out += [
                tower((flax, "self_attn", name, "kernel"), f"{key}.weight", "linear"),
                tower((flax, "self_attn", name, "bias"), f"{key}.bias", "vector"),
            ]
        out += [
            tower(
                (flax, "self_attn", "out_proj", "kernel"),
                f"{hf}.self_attn.out_proj.weight",
                "linear",
                num_in_axes=2,
            ),
            tower((flax, "self_attn", "out_proj", "bias"), f"{hf}.self_attn.out_proj.bias"),
        ]
        for name in ("layer_norm1", "layer_norm2"):
            out += [
                tower((flax, name, "scale"), f"{hf}.{name}.weight"),
                tower((flax, name, "bias"), f"{hf}.{name}.bias"),
            ]
        for name in ("fc1", "fc2"):
            out += [
                tower((flax, "mlp", name, "kernel"), f"{hf}.mlp.{name}.weight", "linear"),
                tower((flax, "mlp", name, "bias"), f"{hf}.mlp.{name}.bias"),
            ]
    return out


def load_pretrained(
    directory: str | Path,
    *,
    output: str = "last",
    dtype: jnp.dtype = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> tuple[CLIPTextEncoder, dict]:
    """(module, params) from a transformers CLIP checkpoint directory (or cached repo id).

    params is the `params` collection: `module.apply({'params': params}, ids, mask)`. With a
    mesh, each parameter is placed straight into its shards by `rules` (default: the
    project's DEFAULT_RULES).
    """
    path = hf_weights.resolve_directory(directory)
    config = CLIPTextConfig.from_hf(hf_weights.read_config(path), source=str(path / "config.json"))
    module = CLIPTextEncoder(config, output=output, dtype=dtype)
    ids = jnp.zeros((1, config.max_position_embeddings), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))["params"]
    params = hf_weights.load_params(
        boxed,
        weight_map(config),
        hf_weights.open_checkpoint(path),
        mesh,
        rules,
        source=str(path),
    )
    return module, params


def save_pretrained(
    directory: str | Path, module: CLIPTextEncoder, params: Mapping, overwrite: bool = False
) -> Path:
    """Writes config.json + model.safetensors that transformers' `from_pretrained` reads.

    params: the `params` collection (as `load_pretrained` returns it). Returns the weights file.
    """
    tensors = hf_weights.export_params(weight_map(module.config), nn.unbox(params))
    return hf_weights.save_checkpoint(
        directory, tensors, module.config.to_hf(), overwrite=overwrite
    )

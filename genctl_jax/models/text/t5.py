"""The T5 encoder (original T5, T5 v1.1 / Flan-T5) in Flax linen, with Hugging Face weights.

Architecture, as in `transformers.T5EncoderModel` (the layout its checkpoints use):

    tokens -> embedding (no position embedding, no scaling)
    -> num_layers x [ x + SelfAttention(RMSNorm(x)),  x + FFN(RMSNorm(x)) ]
    -> RMSNorm -> hidden [B, L, d_model]

- Attention has `num_heads` heads of width `d_kv` (heads * d_kv need not equal d_model), no
  biases and no 1/sqrt(d_kv) scaling of the logits: T5 folds it into the query's init.
  Position enters only through a learned bias per head, looked up by the bucket of the
  relative distance key - query (bidirectional: half the buckets for each sign, of which half
  are exact distances and half log-spaced up to `relative_attention_max_distance`). The table
  belongs to the first layer in the checkpoint, and its bias is shared by every layer; here it
  is computed once per forward and passed to each layer. Padding keys are masked out.
- FFN: `relu` (original T5: wo(relu(wi x))) or `gated-gelu` (v1.1 / Flan:
  wo(gelu_tanh(wi_0 x) * wi_1 x)); no biases.
- RMSNorm (T5LayerNorm): x / sqrt(mean(x^2) + eps) * scale, in float32, no mean, no bias.
- `tie_word_embeddings` only concerns the decoder's LM head, so it is kept for the config
  round trip and does not change the encoder.

Parameters are float32 with logical axis names (embed, heads, head_dim, mlp, vocab, vector);
the projections compute in `dtype`, while the residual stream, norms and softmax stay float32.
`load_pretrained` reads `config.json` + safetensors (a `T5EncoderModel` or a full
`T5ForConditionalGeneration` checkpoint, whose decoder is ignored) straight into shards on a
mesh; `save_pretrained` writes the `T5EncoderModel` layout back.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from genctl_jax.errors import ConfigError
from genctl_jax.io import hf_weights

MODEL_TYPE = "t5"
FEED_FORWARD_PROJ = ("relu", "gated-gelu")

QKV_AXES = ("embed", "heads", "head_dim")
OUT_AXES = ("heads", "head_dim", "embed")
HIDDEN = ("batch", "length", "embed")
HEADS_ACTIVATION = ("batch", "length", "heads", "head_dim")
MLP_ACTIVATION = ("batch", "length", "mlp")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder's architecture, named as in Hugging Face's `T5Config`."""

    vocab_size: int = 32128  # Rows of the token embedding (ids must be below it).
    d_model: int = 512  # Width of the residual stream.
    d_kv: int = 64  # Width of one attention head.
    d_ff: int = 2048  # Hidden width of the feed-forward block.
    num_layers: int = 6  # Encoder layers (the decoder's count is not needed).
    num_heads: int = 8  # Attention heads.
    relative_attention_num_buckets: int = 32  # Relative-distance buckets (both signs together).
    relative_attention_max_distance: int = 128  # Distances from here on share the last bucket.
    feed_forward_proj: str = "relu"  # 'relu' (original T5) or 'gated-gelu' (v1.1, Flan).
    layer_norm_epsilon: float = 1e-6  # Added to the mean square in RMSNorm.
    tie_word_embeddings: bool = (
        True  # Decoder LM head tied to the embedding (kept for round trips).
    )

    def __post_init__(self):
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_heads",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"T5Config.{name}={value!r}: expected a positive integer")
        buckets = self.relative_attention_num_buckets
        if isinstance(buckets, bool) or not isinstance(buckets, int) or buckets < 4:
            raise ConfigError(
                f"T5Config.relative_attention_num_buckets={buckets!r}: expected an integer >= 4 "
                f"(half per direction, of which half are exact distances)"
            )
        if self.relative_attention_max_distance <= buckets // 4:
            raise ConfigError(
                f"T5Config.relative_attention_max_distance={self.relative_attention_max_distance}"
                f": must exceed the {buckets // 4} exact-distance buckets per direction of "
                f"relative_attention_num_buckets={buckets}"
            )
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise ConfigError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"accepted: {', '.join(FEED_FORWARD_PROJ)}"
            )
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
            raise ConfigError(f"T5Config.layer_norm_epsilon={eps!r}: expected a positive float")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(
                f"T5Config.tie_word_embeddings={self.tie_word_embeddings!r}: expected true/false"
            )

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> T5Config:
        """From a `config.json` dict; fields it leaves out take Hugging Face's defaults."""
        model_type = hf.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ConfigError(
                f"config.json has model_type={model_type!r}; this loader reads {MODEL_TYPE!r} "
                f"checkpoints (T5, T5 v1.1, Flan-T5)"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in fields}
        # transformers >= 5 always writes tie_word_embeddings=true and keeps the checkpoint's
        # own flag (false for v1.1 / Flan) as scale_decoder_outputs.
        if "scale_decoder_outputs" in hf:
            values["tie_word_embeddings"] = hf["scale_decoder_outputs"]
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict of a `T5EncoderModel` with this architecture.

        `tie_word_embeddings` is written as such: transformers 4 reads it, and 5 turns it into
        `scale_decoder_outputs` on load.
        """
        return {
            "model_type": MODEL_TYPE,
            "architectures": ["T5EncoderModel"],
            **dataclasses.asdict(self),
        }


PRESETS = {
    # Tests: every code path (buckets beyond the exact range at length >= 3) in a tiny model.
    "tiny": T5Config(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
    ),
    "t5-small": T5Config(),
    "t5-base": T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12),
    # T5 v1.1 XXL and Flan-T5 XXL, Imagen's text encoder.
    "t5-v1_1-xxl": T5Config(
        d_model=4096,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    ),
}


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """[length, length] int32 bucket of key - query for bidirectional attention (host numpy).

    Computed on the host in float32 with the reference's order of operations: distances whose
    log-spaced bucket is an exact integer (16, 32, 64 for the default 32/128) sit on a rounding
    edge, and a device's own `log` (or a rewritten division) could move them to a neighbour.
    """
    position = np.arange(length, dtype=np.int32)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    # Log-spaced buckets for exact <= distance < max_distance, then the last bucket.
    ratio = np.maximum(distance, exact).astype(np.float32) / np.float32(exact)
    log_span = np.float32(math.log(max_distance / exact))
    far = exact + (np.log(ratio) / log_span * np.float32(half - exact)).astype(np.int32)
    far = np.minimum(far, half - 1)
    near_or_far = np.where(distance < exact, distance, far)
    return (np.where(relative > 0, half, 0) + near_or_far).astype(np.int32)


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def _fan_in_normal(scale: float, num_in_axes: int, num_out_axes: int):
    """Truncated normal with variance scale / fan_in over the leading `num_in_axes` dims."""
    return nn.initializers.variance_scaling(
        scale,
        "fan_in",
        "truncated_normal",
        in_axis=tuple(range(num_in_axes)),
        out_axis=tuple(range(num_in_axes, num_in_axes + num_out_axes)),
    )


class Projection(nn.Module):
    """y = x . kernel over the last `num_in_axes` dims of x; bias-free, kernel in final shape.

    The kernel is created as in + out dims (e.g. (embed, heads, head_dim)) so its logical
    names hold inside a mesh (see `genctl_jax.nn.attention.MultiAxisDense`, which has a bias).
    """

    out_shape: tuple[int, ...]  # Trailing output dims, e.g. (heads, head_dim) or (d_model,).
    kernel_axes: tuple[str, ...]  # Logical names of the kernel's in + out dims.
    num_in_axes: int = 1  # Trailing input dims contracted.
    init_scale: float = 1.0  # Kernel variance is init_scale / fan_in.
    dtype: jnp.dtype = jnp.float32  # Compute dtype; the kernel stays float32.

    @nn.compact
    def __call__(self, x):
        n_in = self.num_in_axes
        init = _fan_in_normal(self.init_scale, n_in, len(self.out_shape))
        kernel = self.param(
            "kernel",
            _logical(init, self.kernel_axes),
            tuple(x.shape[-n_in:]) + tuple(self.out_shape),
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        return jax.lax.dot_general(x, kernel, (contract, ((), ())))


class RMSNorm(nn.Module):
    """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, in float32; no mean, no bias."""

    epsilon: float  # Added to the mean square.

    @nn.compact
    def __call__(self, x):
        scale = self.param(
            "scale", _logical(nn.initializers.ones_init(), ("vector",)), x.shape[-1:]
        )
        x = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        return x * jax.lax.rsqrt(variance + self.epsilon) * scale


class SelfAttention(nn.Module):
    """Bias-free multi-head self-attention with an additive position bias, unscaled logits."""

    config: T5Config  # Architecture.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the projections.

    @nn.compact
    def __call__(self, x, position_bias, key_mask):
        """x [B, L, D]; position_bias [H, L, L] float32; key_mask [B, L] bool (True = token)."""
        c = self.config
        heads = (c.num_heads, c.d_kv)

        def project(name, init_scale=1.0):
            y = Projection(heads, QKV_AXES, 1, init_scale, self.dtype, name=name)(x)
            return nn.with_logical_constraint(y, HEADS_ACTIVATION)

        # No 1/sqrt(d_kv) on the logits, so the query's init is smaller by that factor.
        q, k, v = project("q", 1.0 / c.d_kv), project("k"), project("v")
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        logits = logits + position_bias[None]
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = nn.with_logical_constraint(out, HEADS_ACTIVATION)
        return Projection((c.d_model,), OUT_AXES, 2, dtype=self.dtype, name="o")(out)


class FeedForward(nn.Module):
    """wo(relu(wi x)) or, gated, wo(gelu_tanh(wi_0 x) * wi_1 x); no biases."""

    config: T5Config  # Architecture.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the projections.

    @nn.compact
    def __call__(self, x):
        c = self.config

        def dense(name, features, axes, inputs):
            return Projection((features,), axes, dtype=self.dtype, name=name)(inputs)

        if c.gated:
            # `gelu_new` in transformers is the tanh approximation.
            gate = jax.nn.gelu(dense("wi_0", c.d_ff, ("embed", "mlp"), x), approximate=True)
            h = gate * dense("wi_1", c.d_ff, ("embed", "mlp"), x)
        else:
            h = jax.nn.relu(dense("wi", c.d_ff, ("embed", "mlp"), x))
        h = nn.with_logical_constraint(h, MLP_ACTIVATION)
        return dense("wo", c.d_model, ("mlp", "embed"), h)


class T5Layer(nn.Module):
    """x + attention(norm(x)), then x + ffn(norm(x)); the residual stream stays float32."""

    config: T5Config  # Architecture.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the projections.

    @nn.compact
    def __call__(self, x, position_bias, key_mask):
        eps = self.config.layer_norm_epsilon
        h = RMSNorm(eps, name="attention_norm")(x)
        h = SelfAttention(self.config, self.dtype, name="attention")(h, position_bias, key_mask)
        x = nn.with_logical_constraint(x + h.astype(jnp.float32), HIDDEN)
        h = FeedForward(self.config, self.dtype, name="mlp")(RMSNorm(eps, name="mlp_norm")(x))
        return nn.with_logical_constraint(x + h.astype(jnp.float32), HIDDEN)


class T5Encoder(nn.Module):
    """(input_ids [B, L], attention_mask [B, L]) -> (hidden [B, L, D], pooled [B, D]), float32.

    `pooled` is the mean of `hidden` over the tokens the mask keeps (Imagen's pooling).
    """

    config: T5Config  # Architecture (from `T5Config.from_hf` or PRESETS).
    dtype: jnp.dtype = jnp.float32  # Compute dtype; params float32, norms and softmax float32.
    remat: bool = False  # nn.remat each layer (recompute its activations in the backward pass).

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        c = self.config
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"T5Encoder takes input_ids [B, L] and an attention_mask of the same shape; got "
                f"{input_ids.shape} and {attention_mask.shape}"
            )
        length = input_ids.shape[1]
        embed = nn.Embed(
            c.vocab_size,
            c.d_model,
            embedding_init=_logical(nn.initializers.normal(1.0), ("vocab", "embed")),
            name="shared",
        )
        x = nn.with_logical_constraint(embed(input_ids).astype(jnp.float32), HIDDEN)
        # One table (the first layer's in the checkpoint) gives the bias of every layer.
        table = self.param(
            "relative_attention_bias",
            _logical(nn.initializers.normal(c.d_model**-0.5), ("vector", "heads")),
            (c.relative_attention_num_buckets, c.num_heads),
        )
        buckets = relative_position_buckets(
            length, c.relative_attention_num_buckets, c.relative_attention_max_distance
        )
        position_bias = jnp.moveaxis(table[buckets], -1, 0)  # [H, L, L]
        key_mask = attention_mask.astype(bool)
        layer_cls = nn.remat(T5Layer) if self.remat else T5Layer
        for i in range(c.num_layers):
            x = layer_cls(c, self.dtype, name=f"layer_{i}")(x, position_bias, key_mask)
        hidden = RMSNorm(c.layer_norm_epsilon, name="final_norm")(x)
        hidden = nn.with_logical_constraint(hidden, HIDDEN)
        weights = attention_mask.astype(jnp.float32)[..., None]
        pooled = jnp.sum(hidden * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return hidden, pooled


def weight_map(config: T5Config) -> list[hf_weights.Tensor]:
    """Every Flax parameter of `T5Encoder(config)` and its `T5EncoderModel` state-dict key."""
    T = hf_weights.Tensor
    tensors = [
        T(("shared", "embedding"), ("shared.weight", "encoder.embed_tokens.weight")),
        T(
            ("relative_attention_bias",),
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        ),
        T(("final_norm", "scale"), "encoder.final_layer_norm.weight"),
    ]
    ffn = ("wi_0", "wi_1", "wo") if config.gated else ("wi", "wo")
    for i in range(config.num_layers):
        block, layer = f"encoder.block.{i}.layer", f"layer_{i}"
        tensors.append(T((layer, "attention_norm", "scale"), f"{block}.0.layer_norm.weight"))
        for name in ("q", "k", "v"):
            hf = f"{block}.0.SelfAttention.{name}.weight"
            tensors.append(T((layer, "attention", name, "kernel"), hf, "linear"))
        hf = f"{block}.0.SelfAttention.o.weight"
        tensors.append(T((layer, "attention", "o", "kernel"), hf, "linear", num_in_axes=2))
        tensors.append(T((layer, "mlp_norm", "scale"), f"{block}.1.layer_norm.weight"))
        for name in ffn:
            hf = f"{block}.1.DenseReluDense.{name}.weight"
            tensors.append(T((layer, "mlp", name, "kernel"), hf, "linear"))
    return tensors


def load_pretrained(
    directory: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> tuple[T5Encoder, dict]:
    """(module, params) from a Hugging Face T5 directory (or repo id in the local cache).

    Reads `config.json` and `model.safetensors` (or its sharded index); decoder tensors of a
    `T5ForConditionalGeneration` checkpoint are ignored. With a mesh, each parameter is placed
    straight into its shards by its logical names under `rules` (default: the project's).
    """
    directory = hf_weights.resolve_directory(directory)
    config = T5Config.from_hf(hf_weights.read_config(directory))
    module = T5Encoder(config, dtype=dtype)
    checkpoint = hf_weights.open_checkpoint(directory)
    ids = jnp.zeros((1, 1), jnp.int32)
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), ids, ids))["params"]
    params = hf_weights.load_params(
        boxed, weight_map(config), checkpoint, mesh, rules, str(directory)
    )
    return module, params


def save_pretrained(
    directory: str | Path, module: T5Encoder, params: dict, overwrite: bool = False
) -> Path:
    """Writes `config.json` + `model.safetensors` in the `T5EncoderModel` layout; returns the file.

    params: the `params` collection (`module.apply({'params': params}, ...)`), maybe sharded.
    """
    tensors = hf_weights.export_params(weight_map(module.config), params)
    return hf_weights.save_checkpoint(
        directory, tensors, module.config.to_hf(), overwrite=overwrite
    )

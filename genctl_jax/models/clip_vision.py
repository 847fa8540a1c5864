"""CLIP's vision transformer and the full two-tower CLIP in Flax linen, with HF weights.

Matches `transformers.CLIPVisionModel`, `CLIPVisionModelWithProjection` and `CLIPModel`
(whose text tower is `genctl_jax.models.text.clip.CLIPTextEncoder`, reused here):

    x = patch_embedding(pixels)                   conv, kernel = stride = patch_size, no bias
    x = [class_embedding; x] + position_embedding learned, (image_size // patch)^2 + 1 rows
    x = pre_layrnorm(x)                           (sic: the HF parameter name)
    for each layer: the text tower's pre-LN `EncoderLayer`, without the causal mask
    last_hidden_state = x                         NOT normed (as transformers)
    pooler_output = post_layernorm(x[:, 0])       the class token
    image_embeds = visual_projection(pooled)      no bias; when the model has one

`CLIPModel` adds `logit_scale`: logits_per_image = exp(logit_scale) * normalize(image_embeds)
. normalize(text_embeds)^T. Pixels are NHWC, already CLIP-normalised: `CLIPPreprocessing`
turns our images ([-1, 1]) into them inside jit (see its docstring for how it differs from
transformers' PIL-based `CLIPImageProcessor`). Position embeddings are not interpolated:
an image must have the model's `image_size`.

Numerics and sharding follow the text tower: params float32, residual stream, layer norms
and softmax in float32, matmuls and the patch conv in `dtype`; the patch kernel is named
('kernel_h', 'kernel_w', 'conv_in', 'embed'), the position table ('length', 'embed'), layer
kernels ('embed', 'heads', 'head_dim') / ('embed', 'mlp'), the projection ('embed', 'mlp').

Checkpoint keys are transformers': `vision_model.embeddings.patch_embedding.weight`, ...,
`visual_projection.weight` (CLIPVisionModelWithProjection, CLIPModel, every CLIPVisionModel
saved by transformers < 5); transformers 5 saves a `CLIPVisionModel` without the
`vision_model.` prefix. Both are read; `save_pretrained` writes the prefixed layout, which
transformers 5 loads into all three classes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.io import hf_weights
from genctl_jax.models.text import clip as text_clip
from genctl_jax.models.text.clip import (
    ACTIVATION_AXES,
    ACTIVATIONS,
    HF_DEFAULT_PROJECTION_DIM,
    CLIPTextConfig,
    CLIPTextEncoder,
    EncoderLayer,
    layer_norm,
)
from genctl_jax.nn.layers import dense

PREFIX = "vision_model."
# transformers' `CLIPConfig.logit_scale_init_value`: log(1 / 0.07).
HF_DEFAULT_LOGIT_SCALE = 2.6592
# transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (RGB), the default of CLIPImageProcessor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PATCH_KERNEL_AXES = ("kernel_h", "kernel_w", "conv_in", "embed")
# PIL resample codes of preprocessor_config.json -> jax.image.resize methods.
RESAMPLE = {2: "linear", 3: "cubic"}


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# ---------------------------------------------------------------------------------------------
# Configs.


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower's shape (transformers' `CLIPVisionConfig` names and defaults)."""

    hidden_size: int = 768  # Model width.
    intermediate_size: int = 3072  # Hidden width of each layer's MLP.
    num_hidden_layers: int = 12  # Transformer layers.
    num_attention_heads: int = 12  # Heads; must divide hidden_size.
    num_channels: int = 3  # Input channels.
    image_size: int = 224  # Input height = width (no position interpolation).
    patch_size: int = 32  # Patch side: the conv's kernel and stride.
    hidden_act: str = "quick_gelu"  # MLP activation, a key of text.clip.ACTIVATIONS.
    layer_norm_eps: float = 1e-5  # Epsilon of every layer norm.
    projection_dim: int | None = None  # Width of visual_projection (needed with_projection).
    with_projection: bool = False  # image_embeds = visual_projection(pooler_output).

    def __post_init__(self):
        sizes = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_channels",
            "image_size",
            "patch_size",
        )
        for name in sizes:
            value = getattr(self, name)
            if not _positive_int(value):
                raise ConfigError(f"CLIPVisionConfig.{name}={value!r}: expected a positive integer")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"CLIPVisionConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; choose a divisor of it"
            )
        if self.patch_size > self.image_size:
            raise ConfigError(
                f"CLIPVisionConfig.patch_size={self.patch_size} is larger than "
                f"image_size={self.image_size}; expected at most image_size"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"CLIPVisionConfig.hidden_act={self.hidden_act!r} is not supported; accepted: "
                f"{', '.join(ACTIVATIONS)}"
            )
        if self.with_projection and not _positive_int(self.projection_dim):
            raise ConfigError(
                f"CLIPVisionConfig.projection_dim={self.projection_dim!r} with "
                f"with_projection=True: expected the positive width of visual_projection"
            )

    @property
    def num_positions(self) -> int:
        """Tokens per image: the patches and the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], source: str = "config.json") -> CLIPVisionConfig:
        """From a `config.json` of a `CLIPModel` ('clip') or a CLIP vision model.

        A `CLIPModel` has a visual projection (width from its top-level `projection_dim`); a
        'clip_vision_model' has one when its architecture is `CLIPVisionModelWithProjection`.
        """
        return text_clip.tower_config_from_hf(cls, hf_config, "vision", source)

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` that transformers loads as `CLIPVisionModel(WithProjection)`."""
        fields = dataclasses.asdict(self)
        fields.pop("with_projection")
        if fields["projection_dim"] is None:
            fields.pop("projection_dim")
        architecture = (
            "CLIPVisionModelWithProjection" if self.with_projection else "CLIPVisionModel"
        )
        return {"architectures": [architecture], "model_type": "clip_vision_model", **fields}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A two-tower CLIP: both towers project to `projection_dim` (transformers' `CLIPConfig`)."""

    text: CLIPTextConfig  # The text tower (with_projection, projection_dim as below).
    vision: CLIPVisionConfig  # The vision tower (with_projection, projection_dim as below).
    projection_dim: int = HF_DEFAULT_PROJECTION_DIM  # Width of the shared embedding space.
    logit_scale_init_value: float = HF_DEFAULT_LOGIT_SCALE  # Initial log temperature.

    def __post_init__(self):
        for name, tower in (("text", self.text), ("vision", self.vision)):
            if not tower.with_projection or tower.projection_dim != self.projection_dim:
                raise ConfigError(
                    f"CLIPConfig.{name}: with_projection={tower.with_projection}, "
                    f"projection_dim={tower.projection_dim}; both towers must project to "
                    f"CLIPConfig.projection_dim={self.projection_dim}"
                )

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], source: str = "config.json") -> CLIPConfig:
        """From a `CLIPModel` config.json (model_type 'clip')."""
        if hf_config.get("model_type") != "clip":
            raise ConfigError(
                f"{source}: model_type={hf_config.get('model_type')!r} is not a full CLIP; "
                f"accepted: 'clip' (CLIPModel). Load a single tower with "
                f"clip_vision.load_vision_pretrained or text.clip.load_pretrained"
            )
        return cls(
            text=CLIPTextConfig.from_hf(hf_config, source),
            vision=CLIPVisionConfig.from_hf(hf_config, source),
            projection_dim=hf_config.get("projection_dim", HF_DEFAULT_PROJECTION_DIM),
            logit_scale_init_value=hf_config.get("logit_scale_init_value", HF_DEFAULT_LOGIT_SCALE),
        )

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` that transformers loads as `CLIPModel`."""
        text, vision = self.text.to_hf(), self.vision.to_hf()
        text.pop("architectures")
        vision.pop("architectures")
        return {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "text_config": text,
            "vision_config": vision,
        }


def tiny_vision_config(**overrides: Any) -> CLIPVisionConfig:
    """A 2-layer, 32-wide vision tower on 32x32 images in 8x8 patches, for tests."""
    fields = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    return CLIPVisionConfig(**{**fields, **overrides})


def tiny_config(projection_dim: int = 16) -> CLIPConfig:
    """The tiny text and vision towers sharing a `projection_dim`-wide space, for tests."""
    towers = dict(projection_dim=projection_dim, with_projection=True)
    return CLIPConfig(text_clip.tiny_config(**towers), tiny_vision_config(**towers), projection_dim)


# ---------------------------------------------------------------------------------------------
# Modules.


class CLIPVisionOutput(NamedTuple):
    """What `CLIPVisionEncoder` returns (float32; None where not computed)."""

    last_hidden_state: jax.Array  # [B, num_positions, hidden_size]; class token first.
    pooler_output: jax.Array  # [B, hidden_size]: post_layernorm(class token).
    image_embeds: jax.Array | None  # [B, projection_dim] with a projection (not normalised).
    hidden_states: tuple[jax.Array, ...] | None  # With output_hidden_states: layers + 1 states.


class CLIPVisionEncoder(nn.Module):
    """pixel_values [B, image_size, image_size, num_channels] -> `CLIPVisionOutput`.

    pixel_values are CLIP-normalised (see `CLIPPreprocessing`), NHWC. `hidden_states[0]` is
    the input of the first layer (after pre_layrnorm), `hidden_states[i]` the output of
    layer i, as transformers' `output_hidden_states`.
    """

    config: CLIPVisionConfig  # The tower's shape.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the conv and matmuls; params float32.
    remat: bool = False  # Recompute each layer's activations in the backward pass.
    output_hidden_states: bool = False  # Also return every layer's residual stream.

    @nn.compact
    def __call__(self, pixel_values) -> CLIPVisionOutput:
        c = self.config
        check_pixel_values(pixel_values, c)
        batch = pixel_values.shape[0]
        patches = nn.Conv(
            c.hidden_size,
            (c.patch_size, c.patch_size),
            strides=(c.patch_size, c.patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_logical(nn.initializers.lecun_normal(), PATCH_KERNEL_AXES),
            name="patch_embedding",
        )(pixel_values.astype(self.dtype))
        # Row-major over the patch grid, as torch's flatten(2) of NCHW.
        patches = patches.reshape(batch, -1, c.hidden_size).astype(jnp.float32)
        cls = self.param(
            "class_embedding",
            _logical(nn.initializers.normal(c.hidden_size**-0.5), ("vector",)),
            (c.hidden_size,),
        )
        positions = self.param(
            "position_embedding",
            _logical(nn.initializers.normal(0.02), ("length", "embed")),
            (c.num_positions, c.hidden_size),
        )
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, c.hidden_size)), patches], 1)
        x = nn.with_logical_constraint(x + positions, ACTIVATION_AXES)
        x = layer_norm(c.layer_norm_eps, "pre_layrnorm")(x)

        layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
        states = [x]
        for i in range(c.num_hidden_layers):
            x = layer_cls(c, self.dtype, causal=False, name=f"layers_{i}")(x, None)
            states.append(x)
        pooled = layer_norm(c.layer_norm_eps, "post_layernorm")(x[:, 0])
        embeds = None
        if c.with_projection:
            embeds = dense(
                c.projection_dim,
                ("embed", "mlp"),
                dtype=self.dtype,
                use_bias=False,
                name="visual_projection",
            )(pooled).astype(jnp.float32)
        return CLIPVisionOutput(
            last_hidden_state=x,
            pooler_output=pooled.astype(jnp.float32),
            image_embeds=embeds,
            hidden_states=tuple(states) if self.output_hidden_states else None,
        )


def check_pixel_values(pixel_values, config: CLIPVisionConfig) -> None:
    """Refuses (at trace time) what is not a [B, image_size, image_size, channels] float batch."""
    shape = tuple(getattr(pixel_values, "shape", ()))
    expected = (config.image_size, config.image_size, config.num_channels)
    if len(shape) != 4 or shape[1:] != expected:
        raise ValueError(
            f"pixel_values of shape {shape}: the CLIP vision tower takes NHWC [batch, "
            f"{expected[0]}, {expected[1]}, {expected[2]}] (position embeddings are not "
            f"interpolated); resize images with CLIPPreprocessing"
        )
    if not jnp.issubdtype(pixel_values.dtype, jnp.floating):
        raise TypeError(
            f"pixel_values of dtype {pixel_values.dtype}: expected CLIP-normalised floats "
            f"(CLIPPreprocessing makes them from images in [-1, 1])"
        )


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    """x / ||x||_2 along `axis` in float32 (a zero vector stays zero)."""
    x = x.astype(jnp.float32)
    norm_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(norm_sq, jnp.finfo(jnp.float32).tiny))


class CLIPOutput(NamedTuple):
    """What `CLIPModel.__call__` returns (float32)."""

    image_embeds: jax.Array  # [B_img, projection_dim], L2-normalised (as transformers).
    text_embeds: jax.Array  # [B_txt, projection_dim], L2-normalised (as transformers).
    logits_per_image: jax.Array  # [B_img, B_txt] = exp(logit_scale) * cosine similarity.
    vision: CLIPVisionOutput  # The vision tower's outputs (image_embeds unnormalised).
    text_last_hidden_state: jax.Array  # [B_txt, L, text hidden_size].


class CLIPModel(nn.Module):
    """Both towers and `logit_scale`, as transformers' `CLIPModel`.

    `get_image_features(pixel_values)` and `get_text_features(input_ids, attention_mask)` give
    the projected, unnormalised embeddings (call them with `apply(..., method=...)`);
    `__call__` gives both normalised and the logits. Params: {'text_model': ...,
    'vision_model': ..., 'logit_scale': ()}.
    """

    config: CLIPConfig  # Both towers' shapes.
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the matmuls; params stay float32.
    remat: bool = False  # Recompute each layer's activations in the backward pass.

    def setup(self):
        self.text_model = CLIPTextEncoder(self.config.text, dtype=self.dtype, remat=self.remat)
        self.vision_model = CLIPVisionEncoder(
            self.config.vision, dtype=self.dtype, remat=self.remat
        )
        self.logit_scale = self.param(
            "logit_scale",
            _logical(nn.initializers.constant(self.config.logit_scale_init_value), ()),
            (),
        )

    def get_image_features(self, pixel_values) -> jax.Array:
        """[B, projection_dim] projected class tokens (transformers' `get_image_features`)."""
        return self.vision_model(pixel_values).image_embeds

    def get_text_features(self, input_ids, attention_mask=None) -> jax.Array:
        """[B, projection_dim] projected EOS states (transformers' `get_text_features`)."""
        return self.text_model(input_ids, attention_mask)[1]

    def __call__(self, pixel_values, input_ids, attention_mask=None) -> CLIPOutput:
        vision = self.vision_model(pixel_values)
        text_hidden, text_embeds = self.text_model(input_ids, attention_mask)
        image_embeds, text_embeds = normalize(vision.image_embeds), normalize(text_embeds)
        logits = jnp.exp(self.logit_scale) * (image_embeds @ text_embeds.T)
        return CLIPOutput(image_embeds, text_embeds, logits, vision, text_hidden)


# ---------------------------------------------------------------------------------------------
# Weights.


def vision_weight_map(config: CLIPVisionConfig, flax_prefix: tuple[str, ...] = ()):
    """Every Flax parameter of `CLIPVisionEncoder(config)` and its transformers key.

    flax_prefix: where the tower sits in a larger tree (('vision_model',) in `CLIPModel`).
    """

    def tower(flax, key, kind="same", num_in_axes=1):
        # The vision tower's keys, with or without the `vision_model.` prefix (docstring).
        return hf_weights.Tensor((*flax_prefix, *flax), (PREFIX + key, key), kind, num_in_axes)

    out = [
        tower(("patch_embedding", "kernel"), "embeddings.patch_embedding.weight", "conv"),
        tower(("class_embedding",), "embeddings.class_embedding"),
        tower(("position_embedding",), "embeddings.position_embedding.weight"),
        tower(("pre_layrnorm", "scale"), "pre_layrnorm.weight"),
        tower(("pre_layrnorm", "bias"), "pre_layrnorm.bias"),
        tower(("post_layernorm", "scale"), "post_layernorm.weight"),
        tower(("post_layernorm", "bias"), "post_layernorm.bias"),
    ]
    out += text_clip.encoder_layers_weight_map(config.num_hidden_layers, tower)
    if config.with_projection:
        out.append(
            hf_weights.Tensor(
                (*flax_prefix, "visual_projection", "kernel"), "visual_projection.weight", "linear"
            )
        )
    return out


def weight_map(config: CLIPConfig) -> list[hf_weights.Tensor]:
    """Every Flax parameter of `CLIPModel(config)` and its transformers `CLIPModel` key."""
    # A CLIPModel checkpoint has only the prefixed keys (`text_model.`, `vision_model.`).
    text = [
        dataclasses.replace(t, flax=("text_model", *t.flax), hf=t.keys[0])
        for t in text_clip.weight_map(config.text)
    ]
    logit_scale = hf_weights.Tensor(("logit_scale",), "logit_scale")
    vision = [
        dataclasses.replace(t, hf=t.keys[0])
        for t in vision_weight_map(config.vision, ("vision_model",))
    ]
    return [*text, *vision, logit_scale]


def _abstract(module: nn.Module, *args) -> Any:
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"]


def example_pixels(config: CLIPVisionConfig) -> jax.Array:
    """A zero [1, image_size, image_size, channels] batch, to trace `init` with."""
    return jnp.zeros((1, config.image_size, config.image_size, config.num_channels))


def load_vision_pretrained(
    directory: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    output_hidden_states: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> tuple[CLIPVisionEncoder, dict]:
    """(module, params) of the vision tower of a CLIPModel / CLIPVisionModel(WithProjection).

    From a checkpoint directory (or cached repo id); with a mesh, params are placed straight
    into their shards by `rules` (default: the project's DEFAULT_RULES).
    """
    path = hf_weights.resolve_directory(directory)
    config = CLIPVisionConfig.from_hf(
        hf_weights.read_config(path), source=str(path / "config.json")
    )
    module = CLIPVisionEncoder(config, dtype=dtype, output_hidden_states=output_hidden_states)
    params = hf_weights.load_params(
        _abstract(module, example_pixels(config)),
        vision_weight_map(config),
        hf_weights.open_checkpoint(path),
        mesh,
        rules,
        source=str(path),
    )
    return module, params


def load_pretrained(
    directory: str | Path,
    *,
    dtype: jnp.dtype = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    rules: Any = None,
) -> tuple[CLIPModel, dict]:
    """(module, params) of a full transformers `CLIPModel` checkpoint (model_type 'clip')."""
    path = hf_weights.resolve_directory(directory)
    config = CLIPConfig.from_hf(hf_weights.read_config(path), source=str(path / "config.json"))
    module = CLIPModel(config, dtype=dtype)
    ids = jnp.zeros((1, config.text.max_position_embeddings), jnp.int32)
    params = hf_weights.load_params(
        _abstract(module, example_pixels(config.vision), ids),
        weight_map(config),
        hf_weights.open_checkpoint(path),
        mesh,
        rules,
        source=str(path),
    )
    return module, params


def save_pretrained(
    directory: str | Path,
    module: CLIPModel | CLIPVisionEncoder,
    params: Mapping,
    overwrite: bool = False,
) -> Path:
    """Writes config.json + model.safetensors in transformers' layout; returns the weights file.

    A `CLIPModel` is written as `CLIPModel`, a `CLIPVisionEncoder` as `CLIPVisionModel` or
    `CLIPVisionModelWithProjection` (by its config). params: as `load_*pretrained` return them.
    """
    if isinstance(module, CLIPModel):
        tensors, config = weight_map(module.config), module.config.to_hf()
    elif isinstance(module, CLIPVisionEncoder):
        tensors, config = vision_weight_map(module.config), module.config.to_hf()
    else:
        raise TypeError(
            f"save_pretrained takes a CLIPModel or CLIPVisionEncoder, not "
            f"{type(module).__name__} (text towers: genctl_jax.models.text.clip.save_pretrained)"
        )
    exported = hf_weights.export_params(tensors, nn.unbox(params))
    return hf_weights.save_checkpoint(directory, exported, config, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# Preprocessing.


def _size_pair(value, field: str, source: str) -> tuple[int, int]:
    if isinstance(value, Mapping) and {"height", "width"} <= set(value):
        value = (value["height"], value["width"])
    elif _positive_int(value):
        value = (value, value)
    if not (
        isinstance(value, Sequence) and len(value) == 2 and all(_positive_int(v) for v in value)
    ):
        raise ConfigError(
            f"{source}: {field}={value!r}: expected a positive integer or "
            f"{{'height': h, 'width': w}}"
        )
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class CLIPPreprocessing:
    """Images NHWC float in [-1, 1] -> CLIP pixel values, jittable and batched.

    As transformers' `CLIPImageProcessor`: resize (shortest side to `shortest_edge`, the other
    to int(shortest_edge * long / short); or to exactly `size`), center crop (top/left offset
    (resized - crop) // 2), then (x - mean) / std with x in [0, 1]. Values outside [-1, 1]
    are clipped first (as saving to uint8 does); one channel is repeated to RGB.

    Differences from the PIL-based processor (`CLIPImageProcessorPil`; transformers 5's
    default `CLIPImageProcessor` uses torchvision's antialiased bicubic, which also differs
    from PIL by rounding): the resize is `jax.image.resize` (Keys cubic, a = -0.5, and, when
    downsampling, the kernel widened by the scale factor: PIL's antialiasing), done as PIL
    does it, width pass then height pass, each clipped to [0, 1]. It runs in float32 where
    PIL rounds to uint8 after each pass, so the two differ by at most about one uint8 level
    (tests bound it by 1.5 / 255 before normalising, i.e. ~0.02 in normalised units, and
    0.5 / 255 on average); when no resize is needed the result is exact. No quantisation
    to uint8 happens here, so the map is differentiable.
    """

    shortest_edge: int | None = 224  # Resize the short side to this (None: see `size`).
    size: tuple[int, int] | None = None  # Else resize to exactly (h, w); both None: no resize.
    crop_size: tuple[int, int] | None = (224, 224)  # Center crop (h, w); None: no crop.
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN  # Per-channel mean of [0, 1] pixels.
    image_std: tuple[float, ...] = OPENAI_CLIP_STD  # Per-channel std.
    resample: str = "cubic"  # jax.image.resize method: 'cubic' (PIL 3) or 'linear' (PIL 2).

    def __post_init__(self):
        if self.shortest_edge is not None and not _positive_int(self.shortest_edge):
            raise ConfigError(
                f"CLIPPreprocessing.shortest_edge={self.shortest_edge!r}: expected a "
                f"positive integer or None"
            )
        if self.shortest_edge is not None and self.size is not None:
            raise ConfigError("CLIPPreprocessing: set shortest_edge or size, not both")
        if len(self.image_mean) != len(self.image_std) or not all(s > 0 for s in self.image_std):
            raise ConfigError(
                f"CLIPPreprocessing: image_mean={self.image_mean} and image_std="
                f"{self.image_std}: expected one mean and one positive std per channel"
            )
        if self.resample not in RESAMPLE.values():
            raise ConfigError(
                f"CLIPPreprocessing.resample={self.resample!r}: accepted: "
                f"{', '.join(RESAMPLE.values())}"
            )

    @classmethod
    def for_image_size(cls, image_size: int) -> CLIPPreprocessing:
        """OpenAI's defaults for a model taking `image_size` square images."""
        return cls(shortest_edge=image_size, crop_size=(image_size, image_size))

    @classmethod
    def from_hf(
        cls, config: Mapping[str, Any], source: str = "preprocessor_config.json"
    ) -> CLIPPreprocessing:
        """From a `CLIPImageProcessor` preprocessor_config.json (its fields and defaults)."""
        resample = config.get("resample", 3)
        if resample not in RESAMPLE:
            raise ConfigError(
                f"{source}: resample={resample!r} is not supported; accepted: 3 (bicubic), "
                f"2 (bilinear)"
            )
        shortest_edge, size = None, None
        if config.get("do_resize", True):
            value = config.get("size", {"shortest_edge": 224})
            if isinstance(value, Mapping) and "shortest_edge" in value:
                value = value["shortest_edge"]
            if _positive_int(value):  # A bare int is a shortest edge for CLIP.
                shortest_edge = value
            else:
                size = _size_pair(value, "size", source)
        crop = None
        if config.get("do_center_crop", True):
            crop = _size_pair(config.get("crop_size", 224), "crop_size", source)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        if config.get("do_normalize", True):
            mean = tuple(float(m) for m in config.get("image_mean", mean))
            std = tuple(float(s) for s in config.get("image_std", std))
        else:
            mean, std = (0.0,) * len(mean), (1.0,) * len(std)
        try:
            return cls(shortest_edge, size, crop, mean, std, RESAMPLE[resample])
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) after the resize step, for an input of (height, width)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        s = self.shortest_edge
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) of the pixel values made from (height, width) images."""
        return self.crop_size or self.resized_size(height, width)

    def __call__(self, images: jax.Array) -> jax.Array:
        """[B, H, W, C] float in [-1, 1] (C = 1 or len(image_mean)) -> [B, h, w, channels]."""
        shape = tuple(getattr(images, "shape", ()))
        channels = len(self.image_mean)
        if len(shape) != 4 or shape[-1] not in (1, channels) or 0 in shape:
            raise ValueError(
                f"images of shape {shape}: expected NHWC [batch, height, width, {channels}] "
                f"(or 1 channel, repeated) with values in [-1, 1]"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise TypeError(
                f"images of dtype {images.dtype}: expected floats in [-1, 1] (convert uint8 "
                f"with x / 127.5 - 1)"
            )
        x = (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0
        if shape[-1] != channels:
            x = jnp.broadcast_to(x, (*shape[:-1], channels))
        height, width = self.resized_size(shape[1], shape[2])
        # PIL's order: the horizontal pass, then the vertical one, each clipped to [0, 1].
        for axis, target in ((2, width), (1, height)):
            if x.shape[axis] != target:
                new_shape = list(x.shape)
                new_shape[axis] = target
                x = jnp.clip(jax.image.resize(x, new_shape, self.resample, antialias=True), 0, 1)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            if ch > x.shape[1] or cw > x.shape[2]:
                raise ValueError(
                    f"center crop {self.crop_size} is larger than the resized image "
                    f"{x.shape[1:3]} (from input {shape[1:3]}); CLIPImageProcessor would pad "
                    f"with zeros, which genctl_jax does not: use crop_size <= the resize"
                )
            top, left = (x.shape[1] - ch) // 2, (x.shape[2] - cw) // 2
            x = x[:, top : top + ch, left : left + cw]
        mean = jnp.asarray(self.image_mean, jnp.float32)
        std = jnp.asarray(self.image_std, jnp.float32)
        return (x - mean) / std

    def check_matches(self, config: CLIPVisionConfig, where: str = "CLIPPreprocessing") -> None:
        """Refuses preprocessing whose output is not the vision tower's input size."""
        expected = (config.image_size, config.image_size)
        fixed = self.crop_size or self.size
        if fixed is not None and tuple(fixed) != expected:
            raise ConfigError(
                f"{where}: makes {tuple(fixed)} images but the CLIP vision tower takes "
                f"{expected}; use crop_size={expected}"
            )
        if fixed is None and self.shortest_edge != config.image_size:
            raise ConfigError(
                f"{where}: without a center crop the output size depends on the input; "
                f"set crop_size={expected}"
            )
        if len(self.image_mean) != config.num_channels:
            raise ConfigError(
                f"{where}: {len(self.image_mean)} channel means for a tower of "
                f"num_channels={config.num_channels}"
            )


def load_preprocessing(directory: str | Path | None, config: CLIPVisionConfig) -> CLIPPreprocessing:
    """From `directory`/preprocessor_config.json if there is one, else OpenAI's defaults.

    Either way it is checked against the vision tower's input size.
    """
    path = None
    if directory is not None:
        path = hf_weights.resolve_directory(directory) / "preprocessor_config.json"
    if path is not None and path.is_file():
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        out = CLIPPreprocessing.from_hf(hf, source=str(path))
        out.check_matches(config, where=str(path))
        return out
    return CLIPPreprocessing.for_image_size(config.image_size)

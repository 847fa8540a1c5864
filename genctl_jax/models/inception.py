"""The FID Inception network in Flax linen, with pytorch-fid's weights.

This is the InceptionV3 graph that TensorFlow released on 2015-12-05
(`inception-2015-12-05.tgz`), which the original FID code (TTUR) and the Inception Score
code (improved-gan) run, as `pytorch-fid` ports it (`fid_inception_v3` in
`pytorch_fid/inception.py`, weights `pt_inception-2015-12-05-6726825d.pth`). It is
torchvision's InceptionV3 layout (aux classifier dropped) with these differences:

- the average-pool branch of the 35x35 (`Mixed_5b..d`, InceptionA), 17x17 (`Mixed_6b..e`,
  InceptionC) and first 8x8 (`Mixed_7b`, InceptionE) blocks averages over the valid pixels
  only (TensorFlow's SAME pooling; torch's `count_include_pad=False`);
- the pool branch of the last block (`Mixed_7c`) is a 3x3 stride-1 MAX pool;
- the classifier has 1008 outputs (the TF graph's 1000 ImageNet classes plus 8 unused).

Every conv is `BasicConv2d`: conv without bias -> BatchNorm (eps 1e-3, running statistics:
a fixed per-channel affine here) -> ReLU.

Input (pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`): images are
NHWC, any size, values in `input_range` (one of INPUT_RANGES). They are mapped to [0, 1]
(what pytorch-fid takes; from uint8 that is x / 255, as torchvision's `ToTensor`), resized
to 299x299 with torch's `F.interpolate(mode='bilinear', align_corners=False)` (half-pixel
centres, edge clamp, NO antialiasing, also when shrinking) and mapped to [-1, 1] by 2x - 1.
Values outside the range are not clipped. Note that torch-fidelity and the TF reference
code resize differently (TF1's `resize_bilinear` without half-pixel centres), so on
images that are not 299x299 their features differ slightly from pytorch-fid's and ours.

Outputs (`InceptionOutputs`, float32):
- `pool`: [B, 2048], the global average pool ('pool_3' in the TF graph): FID and KID.
- `logits_unbiased`: [B, 1008], pool @ fc.weight.T WITHOUT the bias. This is what the
  Inception Score uses: improved-gan's `inception_score.py` rebuilds the logits as
  `matmul(pool3, w)` from the weight of 'softmax/logits/MatMul' and takes the softmax over
  all 1008 outputs, and torch-fidelity's IS feature ('logits_unbiased') does the same.
  Pass it to `metrics.distribution.inception_score` as is (all 1008 columns).
- `logits`: [B, 1008], the fc layer with its bias (the graph's own 'softmax/logits').

Parameters live in one `params` collection, named as pytorch-fid's state-dict keys
(`Mixed_5b/branch5x5_2/conv/kernel` for `Mixed_5b.branch5x5_2.conv.weight`); each BatchNorm
holds `scale`, `bias`, `mean`, `var` (torch's weight, bias, running_mean, running_var).
Conv kernels are HWIO with logical names (kernel_h, kernel_w, conv_in, conv_out), norm
vectors `vector`, the fc kernel (embed, vocab). Compute: convs in `dtype` at `precision`
(default HIGHEST, so float32 means float32 on TPUs and on GPUs with TF32); the BatchNorm
affine, the pools' average and the classifier in float32.

Weights: `load_params` reads the safetensors file that `python -m
genctl_jax.convert_fid_inception` writes from pytorch-fid's .pth (key names unchanged);
`export_state_dict` / `save_params` write them back. `extract_features` is the jitted
entry point for evaluation on a mesh (batch split over `data` and `fsdp`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.io import hf_weights
from genctl_jax.nn.layers import CONV_AXES, constrain_image

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
CONVERT_COMMAND = "python -m genctl_jax.convert_fid_inception --input {input} --output {output}"
INPUT_SIZE = 299  # The network's input resolution; images are resized to it.
NUM_FEATURES = 2048  # Width of the pool features.
NUM_CLASSES = 1008  # Outputs of the classifier (1000 ImageNet classes + 8 unused).
BN_EPSILON = 1e-3  # TensorFlow's BatchNorm epsilon, kept by the port.
# (low, high) value ranges accepted for input images.
INPUT_RANGES = ((-1.0, 1.0), (0.0, 1.0), (0.0, 255.0))
# Checkpoint entries that inference does not use (BatchNorm's training counter).
IGNORED_SUFFIXES = (".num_batches_tracked",)
# Flax leaf name -> (torch attribute name, layout kind) of the parameters of one layer.
_TORCH_NAMES = {
    ("conv", "kernel"): ("weight", "conv"),
    ("bn", "scale"): ("weight", "same"),
    ("bn", "bias"): ("bias", "same"),
    ("bn", "mean"): ("running_mean", "same"),
    ("bn", "var"): ("running_var", "same"),
    ("fc", "kernel"): ("weight", "linear"),
    ("fc", "bias"): ("bias", "same"),
}


class InceptionOutputs(NamedTuple):
    """What the network returns (float32; see the module docstring)."""

    pool: jax.Array  # [B, 2048] global-average-pool features (FID, KID).
    logits_unbiased: jax.Array  # [B, 1008] pool @ fc kernel, no bias (Inception Score).
    logits: jax.Array  # [B, 1008] fc with bias.


def _logical(init, axes):
    return nn.with_logical_partitioning(init, tuple(axes))


def check_input_range(input_range: Sequence[float]) -> tuple[float, float]:
    """`input_range` as a (low, high) tuple of floats, if it is one of INPUT_RANGES."""
    try:
        value = tuple(float(v) for v in input_range)
    except (TypeError, ValueError):
        value = None
    if value not in INPUT_RANGES:
        accepted = ", ".join(f"({lo:g}, {hi:g})" for lo, hi in INPUT_RANGES)
        raise ConfigError(f"input_range={input_range!r} is not supported; accepted: {accepted}")
    return value


def _resize_weights(in_size: int, out_size: int):
    """Source indices and weights of torch's bilinear resize (align_corners=False) on one axis.

    Output pixel d samples the input at s = in/out * (d + 0.5) - 0.5, clamped below at 0; it
    mixes pixels floor(s) and floor(s) + 1 (the last pixel repeats at the edge) with weights
    1 - frac(s) and frac(s). As in torch's CPU kernel, in/out and d + 0.5 are float32 and the
    multiply-add is fused (one rounding to float32), which matters by up to an ulp of s.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    centres = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # A float32 x float32 product is exact in float64: one rounding, like a fused multiply-add.
    source = (np.float64(scale) * centres.astype(np.float64) - 0.5).astype(np.float32)
    source = np.maximum(source, np.float32(0.0))
    lower = source.astype(np.int32)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = np.clip(source - lower.astype(np.float32), 0.0, 1.0).astype(np.float32)
    return lower, upper, np.float32(1.0) - frac, frac


def _resize_axis(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    lower, upper, w_lower, w_upper = _resize_weights(x.shape[axis], out_size)
    shape = [1] * x.ndim
    shape[axis] = out_size
    return jnp.take(x, lower, axis=axis) * w_lower.reshape(shape) + jnp.take(
        x, upper, axis=axis
    ) * w_upper.reshape(shape)


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """NHWC float images to `size` (H, W) as torch's F.interpolate(mode='bilinear',
    align_corners=False, antialias=False): along the width first, then the height."""
    if images.shape[1:3] == tuple(size):
        return images  # torch's result is then the input itself, bit for bit.
    return _resize_axis(_resize_axis(images, 2, size[1]), 1, size[0])


def preprocess(images: jax.Array, input_range: Sequence[float] = (-1.0, 1.0)) -> jax.Array:
    """[B, H, W, 3] images in `input_range` -> [B, 299, 299, 3] float32 in [-1, 1].

    Exactly pytorch-fid's input path for the same images given in [0, 1]: scale to [0, 1],
    resize (see `resize_bilinear`), then 2x - 1.
    """
    low, high = check_input_range(input_range)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected images [batch, height, width, 3] (NHWC), got {images.shape}")
    # From uint8 this is x / 255, as torchvision's ToTensor; from [0, 1] it changes nothing.
    x = (images.astype(jnp.float32) - low) / (high - low)
    x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return 2.0 * x - 1.0


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics: y = (x - mean) / sqrt(var + eps) * scale + bias.

    Computed in float32 as one per-channel affine (scale / sqrt(var + eps), bias - mean * that),
    which is how torch evaluates an eval-mode BatchNorm.
    """

    epsilon: float = BN_EPSILON  # Added to the running variance.

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]

        def vector(name, init):
            return self.param(name, _logical(init, ("vector",)), (channels,), jnp.float32)

        scale = vector("scale", nn.initializers.ones_init())
        bias = vector("bias", nn.initializers.zeros_init())
        mean = vector("mean", nn.initializers.zeros_init())
        var = vector("var", nn.initializers.ones_init())
        multiplier = scale * jax.lax.rsqrt(var + self.epsilon)
        return x.astype(jnp.float32) * multiplier + (bias - mean * multiplier)


class ConvBN(nn.Module):
    """pytorch-fid's `BasicConv2d`: conv (no bias) -> FrozenBatchNorm -> ReLU."""

    features: int  # Output channels.
    kernel_size: tuple[int, int] = (1, 1)  # (height, width) of the kernel.
    strides: int = 1  # Stride in both directions.
    padding: str = "SAME"  # "SAME" (odd kernels at stride 1: (k - 1) / 2 a side) or "VALID".
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the conv and of the output.
    precision: Any = jax.lax.Precision.HIGHEST  # Conv precision (see the module docstring).

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=self.padding,
            use_bias=False,
            dtype=self.dtype,
            precision=self.precision,
            kernel_init=_logical(nn.initializers.lecun_normal(), CONV_AXES),
            name="conv",
        )(x)
        x = FrozenBatchNorm(name="bn")(x)
        return nn.relu(x).astype(self.dtype)


def avg_pool_3x3(x):
    """3x3 stride-1 average over the valid pixels of each window (TF SAME pooling)."""
    pooled = nn.avg_pool(
        x.astype(jnp.float32), (3, 3), padding=((1, 1), (1, 1)), count_include_pad=False
    )
    return pooled.astype(x.dtype)


def max_pool_3x3(x, strides: int = 1):
    """3x3 max pool: stride 1 SAME (padding never wins) or stride 2 VALID."""
    padding = ((1, 1), (1, 1)) if strides == 1 else "VALID"
    return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=padding)


class _Block(nn.Module):
    """Shared fields of the Inception blocks."""

    dtype: jnp.dtype = jnp.float32  # Compute dtype.
    precision: Any = jax.lax.Precision.HIGHEST  # Conv precision.

    def conv(self, features, kernel_size=(1, 1), strides=1, padding="SAME", *, name):
        return ConvBN(
            features, kernel_size, strides, padding, self.dtype, self.precision, name=name
        )


class InceptionA(_Block):
    """35x35 block (Mixed_5b..d): 1x1, 5x5, double 3x3 and avg-pool -> 1x1 branches."""

    pool_features: int = 32  # Output channels of the pool branch.

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(64, name="branch1x1")(x)
        b5 = self.conv(48, name="branch5x5_1")(x)
        b5 = self.conv(64, (5, 5), name="branch5x5_2")(b5)
        b3 = self.conv(64, name="branch3x3dbl_1")(x)
        b3 = self.conv(96, (3, 3), name="branch3x3dbl_2")(b3)
        b3 = self.conv(96, (3, 3), name="branch3x3dbl_3")(b3)
        bp = self.conv(self.pool_features, name="branch_pool")(avg_pool_3x3(x))
        return constrain_image(jnp.concatenate([b1, b5, b3, bp], axis=-1))


class InceptionB(_Block):
    """35x35 -> 17x17 reduction (Mixed_6a): stride-2 3x3, double 3x3 and max-pool branches."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(384, (3, 3), 2, "VALID", name="branch3x3")(x)
        bd = self.conv(64, name="branch3x3dbl_1")(x)
        bd = self.conv(96, (3, 3), name="branch3x3dbl_2")(bd)
        bd = self.conv(96, (3, 3), 2, "VALID", name="branch3x3dbl_3")(bd)
        bp = max_pool_3x3(x, strides=2)
        return constrain_image(jnp.concatenate([b3, bd, bp], axis=-1))


class InceptionC(_Block):
    """17x17 block (Mixed_6b..e): 1x1, factorised 7x7, double 7x7 and avg-pool branches."""

    channels_7x7: int = 128  # Width inside the 7x7 branches.

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv(192, name="branch1x1")(x)
        b7 = self.conv(c7, name="branch7x7_1")(x)
        b7 = self.conv(c7, (1, 7), name="branch7x7_2")(b7)
        b7 = self.conv(192, (7, 1), name="branch7x7_3")(b7)
        bd = self.conv(c7, name="branch7x7dbl_1")(x)
        bd = self.conv(c7, (7, 1), name="branch7x7dbl_2")(bd)
        bd = self.conv(c7, (1, 7), name="branch7x7dbl_3")(bd)
        bd = self.conv(c7, (7, 1), name="branch7x7dbl_4")(bd)
        bd = self.conv(192, (1, 7), name="branch7x7dbl_5")(bd)
        bp = self.conv(192, name="branch_pool")(avg_pool_3x3(x))
        return constrain_image(jnp.concatenate([b1, b7, bd, bp], axis=-1))


class InceptionD(_Block):
    """17x17 -> 8x8 reduction (Mixed_7a): 3x3 and 7x7-then-3x3 stride-2 and max-pool branches."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv(192, name="branch3x3_1")(x)
        b3 = self.conv(320, (3, 3), 2, "VALID", name="branch3x3_2")(b3)
        b7 = self.conv(192, name="branch7x7x3_1")(x)
        b7 = self.conv(192, (1, 7), name="branch7x7x3_2")(b7)
        b7 = self.conv(192, (7, 1), name="branch7x7x3_3")(b7)
        b7 = self.conv(192, (3, 3), 2, "VALID", name="branch7x7x3_4")(b7)
        bp = max_pool_3x3(x, strides=2)
        return constrain_image(jnp.concatenate([b3, b7, bp], axis=-1))


class InceptionE(_Block):
    """8x8 block (Mixed_7b: avg pool, Mixed_7c: max pool): 1x1, split 3x3, split double 3x3
    and pool branches."""

    pool: str = "avg"  # Pool of the pool branch: "avg" (valid pixels only) or "max".

    @nn.compact
    def __call__(self, x):
        b1 = self.conv(320, name="branch1x1")(x)
        b3 = self.conv(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate(
            [
                self.conv(384, (1, 3), name="branch3x3_2a")(b3),
                self.conv(384, (3, 1), name="branch3x3_2b")(b3),
            ],
            axis=-1,
        )
        bd = self.conv(448, name="branch3x3dbl_1")(x)
        bd = self.conv(384, (3, 3), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate(
            [
                self.conv(384, (1, 3), name="branch3x3dbl_3a")(bd),
                self.conv(384, (3, 1), name="branch3x3dbl_3b")(bd),
            ],
            axis=-1,
        )
        if self.pool not in ("avg", "max"):
            raise ValueError(f"InceptionE.pool={self.pool!r}: accepted: 'avg', 'max'")
        pooled = avg_pool_3x3(x) if self.pool == "avg" else max_pool_3x3(x)
        bp = self.conv(192, name="branch_pool")(pooled)
        return constrain_image(jnp.concatenate([b1, b3, bd, bp], axis=-1))


class Classifier(nn.Module):
    """The 1008-way fc layer in float32; returns (x @ kernel, x @ kernel + bias)."""

    precision: Any = jax.lax.Precision.HIGHEST  # Matmul precision.

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            _logical(nn.initializers.lecun_normal(), ("embed", "vocab")),
            (x.shape[-1], NUM_CLASSES),
            jnp.float32,
        )
        bias = self.param(
            "bias", _logical(nn.initializers.zeros_init(), ("vector",)), (NUM_CLASSES,)
        )
        unbiased = jnp.dot(x, kernel, precision=self.precision)
        return unbiased, unbiased + bias


class FIDInceptionV3(nn.Module):
    """[B, H, W, 3] images in `input_range` -> InceptionOutputs (pool, logits_unbiased, logits).

    The FID Inception network (module docstring); params are its `params` collection.
    """

    input_range: tuple[float, float] = (-1.0, 1.0)  # Value range of the images (INPUT_RANGES).
    dtype: jnp.dtype = jnp.float32  # Compute dtype of the convs; params stay float32.
    precision: Any = jax.lax.Precision.HIGHEST  # Conv and classifier matmul precision.

    def __post_init__(self):
        check_input_range(self.input_range)
        super().__post_init__()

    @nn.compact
    def __call__(self, images) -> InceptionOutputs:
        x = constrain_image(preprocess(images, self.input_range).astype(self.dtype))
        kw = dict(dtype=self.dtype, precision=self.precision)
        x = ConvBN(32, (3, 3), 2, "VALID", **kw, name="Conv2d_1a_3x3")(x)  # 149x149
        x = ConvBN(32, (3, 3), 1, "VALID", **kw, name="Conv2d_2a_3x3")(x)  # 147x147
        x = ConvBN(64, (3, 3), **kw, name="Conv2d_2b_3x3")(x)
        x = max_pool_3x3(x, strides=2)  # 73x73
        x = ConvBN(80, **kw, name="Conv2d_3b_1x1")(x)
        x = ConvBN(192, (3, 3), 1, "VALID", **kw, name="Conv2d_4a_3x3")(x)  # 71x71
        x = constrain_image(max_pool_3x3(x, strides=2))  # 35x35
        x = InceptionA(**kw, pool_features=32, name="Mixed_5b")(x)  # 256 channels
        x = InceptionA(**kw, pool_features=64, name="Mixed_5c")(x)  # 288
        x = InceptionA(**kw, pool_features=64, name="Mixed_5d")(x)  # 288
        x = InceptionB(**kw, name="Mixed_6a")(x)  # 17x17x768
        for name, c7 in (
            ("Mixed_6b", 128),
            ("Mixed_6c", 160),
            ("Mixed_6d", 160),
            ("Mixed_6e", 192),
        ):
            x = InceptionC(**kw, channels_7x7=c7, name=name)(x)
        x = InceptionD(**kw, name="Mixed_7a")(x)  # 8x8x1280
        x = InceptionE(**kw, pool="avg", name="Mixed_7b")(x)  # 8x8x2048
        x = InceptionE(**kw, pool="max", name="Mixed_7c")(x)
        pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits_unbiased, logits = Classifier(self.precision, name="fc")(pool)
        return InceptionOutputs(pool, logits_unbiased, logits)


# --- Weights ------------------------------------------------------------------------------


@functools.cache
def abstract_params() -> dict:
    """The boxed (logically named) `params` of FIDInceptionV3, as shapes only."""
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda x: FIDInceptionV3().init(jax.random.key(0), x), images)["params"]


def _flat_abstract() -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return traverse_util.flatten_dict(nn.unbox(abstract_params()))


def weight_map() -> list[hf_weights.Tensor]:
    """Every Flax parameter and its pytorch-fid state-dict key (`Mixed_5b.branch1x1.bn.weight`)."""
    tensors = []
    for path, _ in _flat_abstract().items():
        torch_name, kind = _TORCH_NAMES[path[-2:]]
        key = ".".join((*path[:-1], torch_name))
        tensors.append(hf_weights.Tensor(path, key, kind))
    return tensors


# How to get the weights file, for error messages ({output}: the file to write).
WEIGHTS_HELP = (
    f"download pytorch-fid's {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} and convert it once: "
    + CONVERT_COMMAND.format(input=FID_WEIGHTS_NAME, output="{output}")
)


def _weights_missing(path: Path) -> CheckpointError:
    return CheckpointError(
        f"FID Inception weights not found at {path}; " + WEIGHTS_HELP.format(output=path)
    )


def check_state_dict(shapes: Mapping[str, Sequence[int]], source: str) -> None:
    """Raises one CheckpointError listing every missing, unexpected and misshapen key.

    shapes: state-dict key -> tensor shape, in pytorch-fid's layout. Keys ending in
    IGNORED_SUFFIXES may be present or not.
    """
    expected = {}
    leaves = _flat_abstract()
    for t in weight_map():
        expected[t.hf] = t.hf_shape(leaves[t.flax].shape)
    present = {k for k in shapes if not k.endswith(IGNORED_SUFFIXES)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    misshapen = sorted(
        f"{k} {tuple(shapes[k])} (expected {expected[k]})"
        for k in present & set(expected)
        if tuple(shapes[k]) != expected[k]
    )
    problems = []
    found = (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen))
    for what, keys in found:
        if keys:
            problems.append(f"{len(keys)} {what}: {', '.join(keys)}")
    if problems:
        raise CheckpointError(
            f"{source} is not pytorch-fid's FID Inception state dict "
            f"({len(expected)} tensors, keys as in fid_inception_v3()): " + "; ".join(problems)
        )


def load_params(path: str | Path, *, mesh: Mesh | None = None, rules: Any = None) -> dict[str, Any]:
    """FIDInceptionV3's `params` from a converted safetensors file (float32).

    Without a mesh the arrays go to the default device. With one, each parameter is
    replicated over the mesh (the network is ~24M params, 95 MB), or placed by the logical
    `rules` when given (e.g. `configlib.DEFAULT_RULES`, which shards conv output channels
    over fsdp). Never unpickles: a .pth is refused with the command that converts it.
    """
    path = Path(path).expanduser()
    if path.suffix in hf_weights.PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path} is a pickle; genctl_jax never unpickles. Convert it once: "
            + CONVERT_COMMAND.format(input=path, output=path.with_suffix(".safetensors"))
        )
    if not path.is_file():
        raise _weights_missing(path)
    try:
        state = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); write it "
            f"with " + CONVERT_COMMAND.format(input=FID_WEIGHTS_NAME, output=path)
        ) from None
    check_state_dict({k: v.shape for k, v in state.items()}, str(path))
    leaves = _flat_abstract()
    values = {
        t.flax: t.to_flax(state[t.hf], leaves[t.flax].shape).astype(np.float32)
        for t in weight_map()
    }
    if mesh is None:
        return jax.device_put(traverse_util.unflatten_dict(values))
    if rules is None:
        replicated = NamedSharding(mesh, PartitionSpec())
        shardings = dict.fromkeys(values, replicated)
    else:
        from genctl_jax.parallel import sharding

        tree = sharding.logical_to_shardings(abstract_params(), mesh, rules, str(path))
        shardings = traverse_util.flatten_dict(tree)
    return traverse_util.unflatten_dict(
        {
            p: jax.make_array_from_callback(v.shape, shardings[p], lambda index, v=v: v[index])
            for p, v in values.items()
        }
    )


def export_state_dict(params: Mapping) -> dict[str, np.ndarray]:
    """pytorch-fid's state dict (numpy, float32) of `params`; inverse of `load_params`.

    BatchNorm's `num_batches_tracked` counters are not weights and are left out; torch's
    `load_state_dict` accepts the result as is (strict) and fills them in.
    """
    return hf_weights.export_params(weight_map(), nn.unbox(params))


def save_params(path: str | Path, params: Mapping, *, overwrite: bool = False) -> Path:
    """Writes `params` as a safetensors file in pytorch-fid's key layout (see `load_params`)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path} exists; pass overwrite=True to replace it")
    tensors = {k: np.ascontiguousarray(v) for k, v in export_state_dict(params).items()}
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
    return path


# --- Evaluation entry point ---------------------------------------------------------------


# `extract_features` precisions: float32 exactly ('highest', pytorch-fid's features to
# float32 rounding) or the backend's fast default (TF32 convolutions on GPUs: 5x faster on
# an H200 at a 5e-4 relative feature error, bench/RESULTS.md). Reference statistics must be
# computed with the same setting as the samples they are compared with.
PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}


@functools.partial(jax.jit, static_argnames=("input_range", "dtype", "precision"))
def _apply(params, images, input_range, dtype, precision):
    module = FIDInceptionV3(input_range=input_range, dtype=dtype, precision=PRECISIONS[precision])
    return module.apply({"params": params}, images)


def extract_features(
    params: Mapping,
    images,
    *,
    input_range: Sequence[float] = (-1.0, 1.0),
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    precision: str = "highest",
) -> InceptionOutputs:
    """InceptionOutputs of one batch of [B, H, W, 3] images, jitted once per shape.

    precision: a key of PRECISIONS ('highest' or 'default').

    images: a jax.Array or a host array. With `mesh`, an array not already on the mesh's
    devices (a host array, or one on a single device) is split over its `data` x `fsdp`
    devices (B must be a multiple of that; pad the last batch); with several processes,
    pass a global batch-sharded array (`jax.make_array_from_process_local_data`).
    params: from `load_params`, on the same devices. Outputs stay sharded like the batch.
    Use one batch size throughout an evaluation, so that only one program is compiled.
    """
    input_range = check_input_range(input_range)
    dtype = jnp.dtype(dtype)
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision={precision!r}: expected one of {', '.join(map(repr, PRECISIONS))}"
        )
    if mesh is not None and not (
        isinstance(images, jax.Array) and images.sharding.device_set == set(mesh.devices.flat)
    ):
        ways = mesh.shape["data"] * mesh.shape["fsdp"]
        if np.ndim(images) < 1 or np.shape(images)[0] % ways:
            raise ValueError(
                f"a batch of shape {np.shape(images)} does not split over the mesh's "
                f"data x fsdp = {ways} devices; use a multiple of {ways} images"
            )
        images = jax.device_put(images, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    return _apply(params, images, input_range, dtype, precision)

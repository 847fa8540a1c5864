"""Text-driven StyleGAN2 editing with CLIP: StyleCLIP latent optimisation and StyleGAN-NADA.

- `styleclip_optimize` (Patashnik et al. 2021, latent optimisation): move given ws so that
  CLIP finds G(w) closer to a text, while an L2 term keeps them near where they started:
      loss = mean_b (1 - cos(E_I(G(w_b)), E_T(text))) + l2_weight * mean_b ||w_b - w_start_b||^2
  (StyleCLIP's code uses the squared norm, lambda_L2 = 0.008; its identity loss is left out).
- `nada_finetune` (Gal et al. 2022): fine-tune a copy of the synthesis network, on random ws
  from the (frozen) mapping network, so that the change the copy makes to each image in CLIP
  space points the way the text moves from a source prompt to a target prompt:
  `losses.directional_clip_loss(E_I(G_frozen(w)), E_I(G_train(w)), E_T(source), E_T(target))`.
  The original params are the frozen generator and get no gradient.

The CLIP pieces are a function of images (`clip_image_fn`: [B, H, W, C] in [-1, 1] ->
unit embeddings [B, D]) and text embeddings (arrays [D] or [B, D]). `load_clip_guidance`
builds both from a transformers `CLIPModel` directory with `metrics.clip_score`'s loader and
preprocessing; its image function is an `inversion.ParamFn`, so the jitted loops here take
CLIP's params as arguments. Any other image embedder (a plain fn(images)) works too. Both
loops run with the generator's noise inputs off and live inside one `jax.jit` (`lax.scan`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from genctl_jax.errors import ConfigError, DataError
from genctl_jax.gan import losses
from genctl_jax.gan.inversion import (
    ParamFn,
    check_w_avg,
    check_ws,
    random_ws,
    split_fn,
    synthesize,
)
from genctl_jax.metrics.clip_score import CLIPScorer
from genctl_jax.models import clip_vision
from genctl_jax.models.clip_vision import CLIPModel, CLIPPreprocessing
from genctl_jax.models.gan import stylegan2

# ------------------------------------------------------------------ CLIP as a guide


@dataclasses.dataclass(frozen=True)
class CLIPImageEmbedder:
    """(params, images [B, H, W, C] in [-1, 1]) -> unit CLIP image embeddings [B, D] float32.

    Resizes, crops and normalises with `preprocessing` (differentiable), then the vision
    tower and its projection. Hashable, so jitted loops reuse their compilation.
    """

    model: CLIPModel  # The two-tower CLIP (only its vision side runs).
    preprocessing: CLIPPreprocessing  # Our images -> the tower's pixel values.

    def __call__(self, params, images):
        pixels = self.preprocessing(images)
        embeds = self.model.apply({"params": params}, pixels, method=CLIPModel.get_image_features)
        return clip_vision.normalize(embeds)


class CLIPGuidance(NamedTuple):
    """A CLIP's image function and text embedder, as the editing functions take them."""

    image_fn: ParamFn  # images [B, H, W, C] in [-1, 1] -> unit embeddings [B, D].
    text_embedding: Callable[[str | Sequence[str]], jax.Array]  # prompts -> unit [N, D].


def clip_guidance(scorer: CLIPScorer) -> CLIPGuidance:
    """The image function and text embedder of a loaded `CLIPScorer` (its model, params,
    preprocessing and tokenizer)."""
    model, params = scorer.model, nn.unbox(scorer.params)
    text_features = jax.jit(
        lambda p, ids, mask: clip_vision.normalize(
            model.apply({"params": p}, ids, mask, method=CLIPModel.get_text_features)
        )
    )

    def text_embedding(prompts: str | Sequence[str]) -> jax.Array:
        ids, mask = scorer.tokenize(prompts)
        return text_features(params, ids, mask)

    return CLIPGuidance(
        ParamFn(CLIPImageEmbedder(model, scorer.preprocessing), params), text_embedding
    )


def load_clip_guidance(
    directory: str | Path,
    *,
    dtype: Any = jnp.float32,
    tokenizer_directory: str | Path | None = None,
) -> CLIPGuidance:
    """`clip_guidance` of a transformers `CLIPModel` directory (see `CLIPScorer.load`)."""
    scorer = CLIPScorer.load(directory, dtype=dtype, tokenizer_directory=tokenizer_directory)
    return clip_guidance(scorer)


def _unit_text(text, dim: int, what: str, batch: int | None = None):
    """A text embedding [D] or [B, D] checked against the image embedding width, unit length."""
    text = jnp.asarray(text, jnp.float32)
    ok = text.ndim == 1 or (text.ndim == 2 and batch is not None and text.shape[0] in (1, batch))
    if not ok or text.shape[-1] != dim:
        rows = f"[{dim}] or [{batch}, {dim}]" if batch is not None else f"[{dim}]"
        raise DataError(
            f"{what} of shape {text.shape}: expected {rows}, the CLIP embedding width of the "
            f"image function"
        )
    return clip_vision.normalize(text)


def _positive_steps(steps) -> None:
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"steps={steps!r}: expected an integer >= 1")


# ------------------------------------------------------------------ StyleCLIP


class StyleCLIPResult(NamedTuple):
    """What `styleclip_optimize` returns."""

    ws: jax.Array  # [B, num_ws, w_dim] the edited latents.
    images: jax.Array  # [B, res, res, C] G(ws), noise off.
    losses: jax.Array  # [steps + 1] total loss before each update, then at the returned ws.
    similarity: jax.Array  # [steps + 1] mean cos(E_I(G(w)), text) at the same ws.


@functools.partial(jax.jit, static_argnames=("generator", "image_apply", "steps"))
def _styleclip(
    generator,
    gen_params,
    image_params,
    text,
    start_ws,
    learning_rate,
    l2_weight,
    *,
    image_apply,
    steps,
):
    def loss_fn(ws):
        images = synthesize(generator, gen_params, ws)
        cos = jnp.sum(clip_vision.normalize(image_apply(image_params, images)) * text, axis=-1)
        l2 = jnp.mean(jnp.sum(jnp.square(ws - start_ws), axis=(1, 2)))
        return jnp.mean(1.0 - cos) + l2_weight * l2, (jnp.mean(cos), images)

    optimizer = optax.adam(learning_rate)

    def body(carry, _):
        ws, opt_state = carry
        (loss, (cos, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ws)
        updates, opt_state = optimizer.update(grads, opt_state, ws)
        return (optax.apply_updates(ws, updates), opt_state), (loss, cos)

    carry = (start_ws, optimizer.init(start_ws))
    (ws, _), (history, similarity) = jax.lax.scan(body, carry, None, length=steps)
    loss, (cos, images) = loss_fn(ws)
    return ws, images, jnp.append(history, loss), jnp.append(similarity, cos)


def styleclip_optimize(
    generator: stylegan2.Generator,
    gen_params,
    clip_image_fn: Callable | ParamFn,
    text_embedding,
    start_ws,
    *,
    steps: int = 300,
    learning_rate: float = 0.1,
    l2_weight: float = 0.008,
) -> StyleCLIPResult:
    """StyleCLIP latent optimisation of start_ws [B, num_ws, w_dim] (W+) towards a text.

    text_embedding: [D] (one text for every image) or [B, D], any norm (normalised here);
    clip_image_fn: images in [-1, 1] -> embeddings [B, D] (normalised here). Adam on the ws;
    learning_rate and l2_weight are traced (changing them does not recompile).
    """
    _positive_steps(steps)
    start_ws = check_ws(generator, start_ws, "start_ws")
    image_apply, image_params = split_fn(clip_image_fn)
    gen_params = nn.unbox(gen_params)
    dim = _embedding_dim(generator, gen_params, image_apply, image_params)
    text = _unit_text(text_embedding, dim, "text_embedding", start_ws.shape[0])
    ws, images, history, similarity = _styleclip(
        generator,
        gen_params,
        image_params,
        text,
        start_ws,
        jnp.float32(learning_rate),
        jnp.float32(l2_weight),
        image_apply=image_apply,
        steps=steps,
    )
    return StyleCLIPResult(ws, images, history, similarity)


def _embedding_dim(generator, gen_params, image_apply, image_params) -> int:
    """The width of the image function's embeddings (traced abstractly, no compute)."""
    res, c = generator.resolution, generator.img_channels
    images = jax.ShapeDtypeStruct((1, res, res, c), jnp.float32)
    out = jax.eval_shape(image_apply, image_params, images)
    if not hasattr(out, "shape") or len(out.shape) != 2:
        raise DataError(f"clip_image_fn returns {out}: expected one embedding per image, [B, D]")
    return out.shape[-1]


# ------------------------------------------------------------------ StyleGAN-NADA


def directional_loss(src_embeds, tgt_embeds, source_text, target_text):
    """`losses.directional_clip_loss`, defined and differentiable where an image direction is 0.

    The loss has no derivative where E_I(G_train(w)) equals E_I(G_frozen(w)), which is every
    sample at the start of fine-tuning: the norm of the image direction is not
    differentiable at zero (JAX gives NaN). Where the unit embeddings are within 1e-6 of each
    other (the same image up to rounding), the value is the loss's value at a zero direction
    (1) and the gradient that of -cos(E_I(G_train(w)), dT): PyTorch's subgradient of the norm
    (0 at 0) gives the same direction. Elsewhere value and gradient are the loss's.
    """
    src = clip_vision.normalize(src_embeds)
    tgt = clip_vision.normalize(tgt_embeds)
    same = jnp.sum(jnp.square(tgt - src), axis=-1) <= 1e-12  # [B]
    # Where the direction is zero, the loss sees a stand-in target without gradient.
    stand_in = jnp.where(same[:, None], jax.lax.stop_gradient(-src_embeds), tgt_embeds)
    text_axis = 0 if jnp.ndim(source_text) == 2 else None
    per_sample = jax.vmap(
        lambda s, t, ts, tt: losses.directional_clip_loss(s[None], t[None], ts, tt),
        in_axes=(0, 0, text_axis, 0 if jnp.ndim(target_text) == 2 else None),
    )(src_embeds, stand_in, source_text, target_text)
    d_text = clip_vision.normalize(
        clip_vision.normalize(target_text) - clip_vision.normalize(source_text)
    )
    surrogate = -jnp.sum(tgt * d_text, axis=-1)
    surrogate = 1.0 + surrogate - jax.lax.stop_gradient(surrogate)
    return jnp.mean(jnp.where(same, surrogate, per_sample))


class NadaResult(NamedTuple):
    """What `nada_finetune` returns."""

    params: dict  # Generator params: the original mapping, the fine-tuned synthesis.
    losses: jax.Array  # [steps] directional loss of each step's batch, before its update.


def _embed_pair(image_apply, image_params, frozen_images, images):
    """(E_I(frozen_images), E_I(images)) in one batched call; no gradient to frozen_images."""
    both = jnp.concatenate([jax.lax.stop_gradient(frozen_images), images])
    embeds = image_apply(image_params, both)
    return embeds[: images.shape[0]], embeds[images.shape[0] :]


def _sample_ws(generator, gen_params, rng, n, w_avg, psi):
    ws = random_ws(generator, gen_params, rng, n)
    return ws if w_avg is None else stylegan2.truncate(ws, w_avg, psi)


@functools.partial(
    jax.jit, static_argnames=("generator", "image_apply", "steps", "batch_size", "b1", "b2")
)
def _nada(
    generator,
    gen_params,
    image_params,
    source_text,
    target_text,
    rng,
    learning_rate,
    w_avg,
    psi,
    *,
    image_apply,
    steps,
    batch_size,
    b1,
    b2,
):
    optimizer = optax.adam(learning_rate, b1=b1, b2=b2)

    def body(carry, step):
        synthesis, opt_state = carry
        ws = _sample_ws(
            generator, gen_params, jax.random.fold_in(rng, step), batch_size, w_avg, psi
        )
        frozen_images = synthesize(generator, gen_params, ws)

        def loss_fn(synthesis):
            images = synthesize(generator, dict(gen_params, synthesis=synthesis), ws)
            src, tgt = _embed_pair(image_apply, image_params, frozen_images, images)
            return directional_loss(src, tgt, source_text, target_text)

        loss, grads = jax.value_and_grad(loss_fn)(synthesis)
        updates, opt_state = optimizer.update(grads, opt_state, synthesis)
        return (optax.apply_updates(synthesis, updates), opt_state), loss

    synthesis = gen_params["synthesis"]
    carry = (synthesis, optimizer.init(synthesis))
    (synthesis, _), history = jax.lax.scan(body, carry, jnp.arange(steps))
    return synthesis, history


def nada_finetune(
    generator: stylegan2.Generator,
    gen_params,
    clip_image_fn: Callable | ParamFn,
    source_text_embedding,
    target_text_embedding,
    *,
    rng,
    steps: int = 300,
    batch_size: int = 4,
    learning_rate: float = 0.002,
    b1: float = 0.0,
    b2: float = 0.99,
    w_avg=None,
    truncation_psi: float = 1.0,
) -> NadaResult:
    """StyleGAN-NADA: fine-tunes a copy of the synthesis params towards a text direction.

    Each step draws batch_size ws from the frozen mapping network (key fold_in(rng, step);
    truncated towards w_avg by truncation_psi when w_avg is given), renders them with the
    frozen params and the trained copy, and takes an Adam step (NADA's b1 = 0, b2 = 0.99) on
    the copy. source/target text embeddings: [D] each (e.g. `text_embedding(['photo'])[0]`).
    gen_params is left as it is (nothing is donated); the returned params share its mapping.
    """
    _positive_steps(steps)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if w_avg is None and truncation_psi != 1.0:
        raise ConfigError(
            f"truncation_psi={truncation_psi}: truncation needs w_avg, the tracked mean w"
        )
    gen_params = nn.unbox(gen_params)
    image_apply, image_params = split_fn(clip_image_fn)
    dim = _embedding_dim(generator, gen_params, image_apply, image_params)
    source = _unit_text(source_text_embedding, dim, "source_text_embedding")
    target = _unit_text(target_text_embedding, dim, "target_text_embedding")
    if w_avg is not None:
        w_avg = check_w_avg(generator, w_avg)
    synthesis, history = _nada(
        generator,
        gen_params,
        image_params,
        source,
        target,
        rng,
        jnp.float32(learning_rate),
        w_avg,
        jnp.float32(truncation_psi),
        image_apply=image_apply,
        steps=steps,
        batch_size=batch_size,
        b1=float(b1),
        b2=float(b2),
    )
    return NadaResult(dict(gen_params, synthesis=synthesis), history)


@functools.partial(jax.jit, static_argnames=("generator", "image_apply"))
def _directional(generator, frozen, tuned, image_params, source, target, ws, *, image_apply):
    frozen_images = synthesize(generator, frozen, ws)
    src, tgt = _embed_pair(
        image_apply, image_params, frozen_images, synthesize(generator, tuned, ws)
    )
    return directional_loss(src, tgt, source, target)


def nada_directional_loss(
    generator: stylegan2.Generator,
    frozen_params,
    tuned_params,
    clip_image_fn: Callable | ParamFn,
    source_text_embedding,
    target_text_embedding,
    ws,
) -> jax.Array:
    """The directional CLIP loss (`directional_loss`) of a fine-tuned generator on ws.

    1 where the two make the same images (a zero image direction; rounding included), below
    1 as the change they make follows the text direction, 0 when it follows it exactly.
    """
    ws = check_ws(generator, ws)
    image_apply, image_params = split_fn(clip_image_fn)
    frozen, tuned = nn.unbox(frozen_params), nn.unbox(tuned_params)
    dim = _embedding_dim(generator, frozen, image_apply, image_params)
    source = _unit_text(source_text_embedding, dim, "source_text_embedding")
    target = _unit_text(target_text_embedding, dim, "target_text_embedding")
    return _directional(
        generator, frozen, tuned, image_params, source, target, ws, image_apply=image_apply
    )

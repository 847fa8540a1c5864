"""The core's multi-network design: alternating phases, lazy phases, frozen networks.

A toy GAN-shaped task (generator, discriminator, frozen feature network) runs through
the same `layout` and `make_train_step` as every family.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from genctl_jax import configlib
from genctl_jax.nn.layers import dense
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.trainers import state as state_lib
from genctl_jax.trainers import step as step_lib
from genctl_jax.trainers.task import Phase, Task


class Mlp(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x):
        return dense(self.width, ("embed", "mlp"))(jnp.tanh(dense(16, ("embed", "mlp"))(x)))


class ToyGan(Task):
    """G maps noise to 8-d points; D scores them; a frozen network embeds D's input."""

    generator, discriminator, features = Mlp(8), Mlp(1), Mlp(8)

    def init_params(self, rng, batch):
        x = jnp.zeros((1, 8))
        keys = jax.random.split(rng, 3)
        return {
            "generator": self.generator.init(keys[0], x)["params"],
            "discriminator": self.discriminator.init(keys[1], x)["params"],
            "features": self.features.init(keys[2], x)["params"],
        }

    def _score(self, params, x):
        embedded = self.features.apply({"params": params["features"]}, x)
        return self.discriminator.apply({"params": params["discriminator"]}, embedded)

    def _fake(self, params, rng, n):
        noise = jax.random.normal(rng, (n, 8))
        return self.generator.apply({"params": params["generator"]}, noise)

    def d_loss(self, params, batch, rng, step):
        fake = jax.lax.stop_gradient(self._fake(params, rng, batch["x"].shape[0]))
        real, fake = self._score(params, batch["x"]), self._score(params, fake)
        loss = jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake))
        return loss, {"real_score": jnp.mean(real)}

    def g_loss(self, params, batch, rng, step):
        fake = self._fake(params, rng, batch["x"].shape[0])
        return jnp.mean(jax.nn.softplus(-self._score(params, fake))), {}

    def r1(self, params, batch, rng, step):
        score = lambda x: jnp.sum(self._score(params, x))
        penalty = jnp.mean(jnp.sum(jnp.square(jax.grad(score)(batch["x"])), axis=-1))
        return penalty, {}

    @property
    def phases(self):
        return (
            Phase("d", ("discriminator",), self.d_loss),
            Phase("r1", ("discriminator",), self.r1, every=2),
            Phase("g", ("generator",), self.g_loss),
        )


@pytest.fixture(scope="module")
def toy():
    config = configlib.base_config()
    config.trainer.ema_decay = 0.9
    config.sharding.max_replicated_fraction = 0.2  # 16- and 1-wide biases of tiny MLPs
    config.mesh.fsdp = 4
    mesh = mesh_lib.create_mesh(config.mesh)
    task = ToyGan(config)
    optimizers = {
        "discriminator": optax.sgd(0.1),
        "generator": optax.adam(1e-2, b1=0.0, b2=0.99),
    }
    batch = {"x": jax.device_put(jnp.ones((8, 8)) * 0.5, mesh_lib.batch_sharding(mesh))}
    layout = state_lib.layout(task, optimizers, config, mesh, step_lib.batch_spec(batch))
    step = jax.jit(
        step_lib.make_train_step(task, optimizers, config.trainer, mesh),
        out_shardings=(layout.shardings, mesh_lib.replicated(mesh)),
    )
    with jax.set_mesh(mesh), nn.logical_axis_rules(configlib.DEFAULT_RULES):
        state = layout.initialize()
        states = [state]
        metrics = []
        for _ in range(3):
            state, m = step(state, batch)
            states.append(state)
            metrics.append(jax.device_get(m))
    return task, layout, [jax.device_get(s) for s in states], metrics


def pairs(a, b):
    return zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)


def changed(a, b):
    return any(not np.array_equal(x, y) for x, y in pairs(a, b))


def test_each_network_has_its_own_optimizer_and_the_frozen_one_has_none(toy):
    task, layout, states, _ = toy
    assert task.trained_networks == ("discriminator", "generator")
    assert set(states[0].opt_state) == {"discriminator", "generator"}
    assert set(states[0].ema_params) == {"discriminator", "generator"}
    kernel = layout.shardings.params["generator"]["Dense_0"]["kernel"]
    assert kernel.spec[0] == "fsdp"


def test_phases_update_only_their_networks(toy):
    _, _, states, metrics = toy
    for before, after in zip(states[:-1], states[1:], strict=True):
        assert changed(before.params["generator"], after.params["generator"])
        assert changed(before.params["discriminator"], after.params["discriminator"])
        for x, y in pairs(before.params["features"], after.params["features"]):
            np.testing.assert_array_equal(x, y)  # frozen: no gradient, no update
    assert set(metrics[0]) >= {"d/loss", "d/grad_norm", "d/real_score", "g/loss", "r1/loss"}


def test_lazy_phase_runs_every_second_step_only(toy):
    _, _, _, metrics = toy
    r1 = [float(m["r1/loss"]) for m in metrics]
    assert r1[0] > 0 and r1[1] == 0.0 and r1[2] > 0  # steps 0 and 2 run it, step 1 does not
    assert all(not bool(m["update_skipped"]) for m in metrics)


def test_phases_match_hand_written_alternating_updates(toy):
    """Step 0 equals: D sgd step, then R1 sgd step on the new D, then G adam step."""
    task, _, states, _ = toy
    s0 = states[0]
    params = dict(s0.params)
    rng = lambda i: jax.random.fold_in(jax.random.fold_in(s0.rng, 0), i)
    batch = {"x": jnp.ones((8, 8)) * 0.5}
    for index, loss_fn in [(0, task.d_loss), (1, task.r1)]:
        key = rng(index)
        d_loss = lambda d, loss_fn=loss_fn, key=key: loss_fn(
            {**params, "discriminator": d}, batch, key, 0
        )[0]
        grads = jax.grad(d_loss)(params["discriminator"])
        params["discriminator"] = jax.tree.map(
            lambda p, g: p - 0.1 * g, params["discriminator"], grads
        )
    grads = jax.grad(lambda p: task.g_loss({**params, "generator": p}, batch, rng(2), 0)[0])(
        params["generator"]
    )
    adam = optax.adam(1e-2, b1=0.0, b2=0.99)
    updates, _ = adam.update(grads, adam.init(params["generator"]), params["generator"])
    params["generator"] = optax.apply_updates(params["generator"], updates)
    for name in ("discriminator", "generator"):
        for x, y in pairs(states[1].params[name], params[name]):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    # EMA with warm-up: decay = min(0.9, 1/10) at step 0.
    ema = jax.tree.map(
        lambda e, p: 0.1 * e + 0.9 * p, s0.ema_params["generator"], params["generator"]
    )
    for x, y in pairs(states[1].ema_params["generator"], ema):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_config_validation_names_missing_optimizer_block():
    from genctl_jax.errors import ConfigError
    from genctl_jax.trainers import optim

    config = ml_collections.ConfigDict({"optimizers": {"generator": optim.default_config()}})
    with pytest.raises(ConfigError, match=r"config\.optimizers\.discriminator is missing"):
        optim.validate(config, ("discriminator", "generator"))

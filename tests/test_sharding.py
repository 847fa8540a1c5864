"""Mesh sizing and logical-axis sharding of parameters."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from genctl_jax import configlib
from genctl_jax.errors import ConfigError
from genctl_jax.parallel import mesh as mesh_lib
from genctl_jax.parallel import sharding


def mesh_of(**axes):
    return mesh_lib.create_mesh(ml_collections.ConfigDict(axes))


def test_mesh_shape_fills_the_minus_one_axis():
    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=4, tensor=1))
    assert mesh_lib.mesh_shape(cfg, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_lib.mesh_shape(cfg, 4) == {"data": 1, "fsdp": 4, "tensor": 1}
    mesh = mesh_of(data=-1, fsdp=2, tensor=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


class Named(nn.Module):
    """Params with chosen logical names and sizes."""

    names: tuple
    shape: tuple = (16, 8)

    @nn.compact
    def __call__(self):
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), self.names)
        big = self.param("big", init, self.shape)
        small = self.param(
            "small", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vector",)), (8,)
        )
        return big, small


def abstract_params(names, shape=(16, 8)):
    return jax.eval_shape(lambda: Named(names, shape).init(jax.random.PRNGKey(0)))["params"]


def test_logical_names_map_to_mesh_axes_and_fall_back_when_indivisible():
    mesh = mesh_of(data=2, fsdp=4, tensor=1)
    rules = configlib.DEFAULT_RULES
    shardings = sharding.logical_to_shardings(abstract_params(("embed", "mlp")), mesh, rules, "t")
    assert shardings["big"].spec == P("fsdp", "tensor")
    assert shardings["small"].spec == P(None)
    # 6 rows cannot be split 4 ways: that dimension is replicated instead of failing in XLA.
    odd = sharding.logical_to_shardings(abstract_params(("embed", "mlp"), (6, 8)), mesh, rules, "t")
    assert odd["big"].spec == P(None, "tensor")


def test_unknown_logical_name_is_refused_with_its_path():
    mesh = mesh_of(data=2, fsdp=4, tensor=1)
    with pytest.raises(ConfigError, match=r"params/big uses logical axis 'hidden'.*add \('hidden'"):
        sharding.logical_to_shardings(
            abstract_params(("embed", "hidden")), mesh, configlib.DEFAULT_RULES, "params"
        )


def test_too_much_replication_on_fsdp_is_refused():
    mesh = mesh_of(data=2, fsdp=4, tensor=1)
    params = abstract_params(("mlp", "vector"))  # nothing maps to fsdp
    shardings = sharding.logical_to_shardings(params, mesh, configlib.DEFAULT_RULES, "p")
    with pytest.raises(ConfigError, match=r"p: 100.0% of parameter bytes stay replicated.*big"):
        sharding.check_sufficiently_sharded(params, shardings, mesh, 0.05, "p")
    # The 8-float bias alone is 5.9% of the bytes: allowed at 10%, refused at 5%.
    params = abstract_params(("embed", "mlp"))
    shardings = sharding.logical_to_shardings(params, mesh, configlib.DEFAULT_RULES, "p")
    assert sharding.check_sufficiently_sharded(params, shardings, mesh, 0.1, "p") == pytest.approx(
        8 / (16 * 8 + 8)
    )
    with pytest.raises(ConfigError, match="5.9% of parameter bytes"):
        sharding.check_sufficiently_sharded(params, shardings, mesh, 0.05, "p")
    # Without an fsdp axis there is nothing to check.
    single = mesh_of(data=-1, fsdp=1, tensor=1)
    plain = sharding.logical_to_shardings(params, single, configlib.DEFAULT_RULES, "p")
    assert sharding.check_sufficiently_sharded(params, plain, single, 0.0, "p") == 0.0


def test_network_rules_override_the_default_table():
    cfg = configlib.base_config().sharding
    cfg.network_rules.frozen_encoder = tuple(
        (name, None if name == "embed" else target) for name, target in cfg.rules
    )
    mesh = mesh_of(data=2, fsdp=4, tensor=1)
    params = abstract_params(("embed", "mlp"))
    default = sharding.logical_to_shardings(params, mesh, sharding.rules_for(cfg), "p")
    frozen = sharding.logical_to_shardings(
        params, mesh, sharding.rules_for(cfg, "frozen_encoder"), "p"
    )
    assert default["big"].spec == P("fsdp", "tensor")
    assert frozen["big"].spec == P(None, "tensor")


def test_activation_constraint_follows_the_rules():
    mesh = mesh_of(data=2, fsdp=4, tensor=1)

    def f(x):
        return nn.with_logical_constraint(x * 2, ("batch", "height", "width", "channels"))

    with jax.set_mesh(mesh), nn.logical_axis_rules(configlib.DEFAULT_RULES):
        y = jax.jit(f)(jnp.ones((8, 4, 4, 3)))
    assert y.sharding.spec == P(("data", "fsdp"))

"""Logical axis names -> mesh shardings, and the checks that keep sharding honest.

Parameters are created with `nn.with_logical_partitioning` and activations are
constrained with `nn.with_logical_constraint`; `config.sharding.rules` maps each
logical name to mesh axes. This module turns the logical annotations of an
abstract (boxed) tree into `NamedSharding`s, refuses names the rules do not know,
and refuses a layout that leaves too many parameter bytes replicated on `fsdp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genctl_jax.configlib import MESH_AXES
from genctl_jax.errors import ConfigError

Rules = tuple[tuple[str, Any], ...]


def _check_rules(rules: Sequence[Any], field: str) -> Rules:
    seen = set()
    out = []
    for rule in rules:
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(
                f"{field} holds {rule!r}; each rule is (logical_name, mesh_axis) where "
                f"mesh_axis is None, one of {MESH_AXES} or a tuple of them"
            )
        name, target = rule
        targets = (target,) if target is None or isinstance(target, str) else tuple(target)
        bad = [t for t in targets if t is not None and t not in MESH_AXES]
        if bad:
            raise ConfigError(
                f"{field}: logical axis {name!r} maps to unknown mesh axis {bad[0]!r}; "
                f"accepted: None or {', '.join(MESH_AXES)}"
            )
        if name in seen:
            raise ConfigError(f"{field}: logical axis {name!r} is listed twice")
        seen.add(name)
        out.append((name, target if target is None or isinstance(target, str) else targets))
    return tuple(out)


def validate_rules(sharding_config: ml_collections.ConfigDict) -> None:
    """Checks the rules tables' syntax (names used by params are checked at init)."""
    _check_rules(sharding_config.rules, "config.sharding.rules")
    for network, rules in sharding_config.network_rules.items():
        _check_rules(rules, f"config.sharding.network_rules.{network}")
    fraction = sharding_config.max_replicated_fraction
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(
            f"config.sharding.max_replicated_fraction={fraction!r}: expected a value in [0, 1]"
        )


def rules_for(sharding_config: ml_collections.ConfigDict, network: str | None = None) -> Rules:
    """The rules table of one network (its own entry in `network_rules`, else the default)."""
    if network is not None and network in sharding_config.network_rules:
        return _check_rules(
            sharding_config.network_rules[network], f"config.sharding.network_rules.{network}"
        )
    return _check_rules(sharding_config.rules, "config.sharding.rules")


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _spec_names(spec: PartitionSpec) -> list[str]:
    names = []
    for entry in spec:
        if entry is None:
            continue
        names.extend((entry,) if isinstance(entry, str) else entry)
    return names


def check_logical_names(logical_specs: Any, rules: Rules, where: str) -> None:
    """Every logical name used by a parameter must appear in the rules table."""
    known = {name for name, _ in rules}
    leaves = jax.tree_util.tree_leaves_with_path(
        logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    for path, spec in leaves:
        for name in _spec_names(spec):
            if name not in known:
                raise ConfigError(
                    f"{where}/{_path_str(path)} uses logical axis {name!r}, which "
                    f"config.sharding.rules does not map; add ({name!r}, <mesh axis or None>) "
                    f"to the rules. Known: {', '.join(sorted(known))}"
                )


def logical_to_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules, where: str) -> Any:
    """Mesh shardings for an abstract tree whose leaves may carry logical names.

    A dimension that the mesh axes do not divide falls back to replication (counted
    by `check_sufficiently_sharded`), so odd-sized small params never break a run.
    """
    logical_specs = nn.get_partition_spec(abstract_boxed)
    check_logical_names(logical_specs, rules, where)
    shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, rules)
    values = nn.unbox(abstract_boxed)
    return jax.tree.map(
        lambda value, sharding: _divisible(value.shape, sharding), values, shardings
    )


def _divisible(shape: tuple[int, ...], sharding: NamedSharding) -> NamedSharding:
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else entry
        if shape[dim] % math.prod(sharding.mesh.shape[a] for a in axes):
            spec[dim] = None
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


def replicated_on(sharding: NamedSharding, axis: str) -> bool:
    return axis not in _spec_names(sharding.spec)


def check_sufficiently_sharded(
    abstract_params: Any, shardings: Any, mesh: Mesh, max_fraction: float, where: str
) -> float:
    """Refuses a layout that keeps > `max_fraction` of parameter bytes whole on each fsdp shard.

    Returns the replicated fraction (0 when there is no fsdp axis to shard over).
    """
    if mesh.shape["fsdp"] <= 1:
        return 0.0
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
    flat_shardings = jax.tree.leaves(shardings)
    total = 0
    replicated = []
    for (path, value), sharding in zip(leaves, flat_shardings, strict=True):
        nbytes = value.size * value.dtype.itemsize
        total += nbytes
        if replicated_on(sharding, "fsdp"):
            replicated.append((nbytes, _path_str(path), value.shape))
    fraction = sum(r[0] for r in replicated) / max(total, 1)
    if fraction > max_fraction:
        replicated.sort(reverse=True)
        largest = "; ".join(f"{p} {tuple(s)}" for _, p, s in replicated[:5])
        raise ConfigError(
            f"{where}: {fraction:.1%} of parameter bytes stay replicated over the fsdp axis "
            f"(size {mesh.shape['fsdp']}), more than config.sharding.max_replicated_fraction="
            f"{max_fraction}. Largest replicated: {largest}. Give these params logical axis "
            f"names that config.sharding.rules maps to 'fsdp' (with sizes the axis divides), "
            f"or raise the limit"
        )
    if replicated:
        logging.info("%s: %.2f%% of parameter bytes replicated over fsdp", where, 100 * fraction)
    return fraction

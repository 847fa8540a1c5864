"""Multi-process start-up: read the launcher's GENCTL_* variables and join the JAX cluster.

Every entry point calls `initialize()` before it touches JAX. The launchers in `launch/` set:

  GENCTL_COORDINATOR        host:port of process 0's coordination service
  GENCTL_NUM_PROCESSES      number of processes in the run (unset or 1: single process)
  GENCTL_PROCESS_ID         this process's index, 0 <= id < GENCTL_NUM_PROCESSES
  GENCTL_LOCAL_DEVICES      optional: fake CPU devices per process (local testing)
  GENCTL_AUTO_DISTRIBUTED   1 on Cloud TPU VM slices and GKE, where JAX detects the cluster

Explicit variables and GENCTL_AUTO_DISTRIBUTED are mutually exclusive, so a run never silently
mixes a hand-written topology with an auto-detected one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import orbax.checkpoint as ocp

from genctl_jax.errors import ConfigError

ENV_COORDINATOR = "GENCTL_COORDINATOR"
ENV_NUM_PROCESSES = "GENCTL_NUM_PROCESSES"
ENV_PROCESS_ID = "GENCTL_PROCESS_ID"
ENV_LOCAL_DEVICES = "GENCTL_LOCAL_DEVICES"
ENV_AUTO = "GENCTL_AUTO_DISTRIBUTED"

_TRUE = ("1", "true", "yes")
_FALSE = ("", "0", "false", "no")

# Set once initialize() has finished, so a second call is a no-op.
_done = False

# How long `barrier` waits for the last process: one may be building a dataset or compiling.
BARRIER_TIMEOUT_S = 3600


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize()` will do, derived from the environment alone (no JAX calls)."""

    mode: str  # "single", "explicit" or "auto"
    coordinator: str | None = None
    num_processes: int | None = 1  # None: detected by JAX ("auto")
    process_id: int | None = 0
    local_devices: int | None = None


def _int_var(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ConfigError(
            f"{name}={raw!r} is not an integer >= {minimum}; set it to one (or unset it)."
        )
    return value


def _check_coordinator(raw: str) -> str:
    host, sep, port = raw.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"{ENV_COORDINATOR}={raw!r} is not host:port; set it to the address process 0 "
            "can listen on, e.g. GENCTL_COORDINATOR=10.0.0.2:1234 (port 1-65535)."
        )
    return raw.strip()


def plan_from_env(env: Mapping[str, str] | None = None) -> Plan:
    """Validates the GENCTL_* variables and says how to initialise; raises ConfigError."""
    env = os.environ if env is None else env
    local_devices = _int_var(env, ENV_LOCAL_DEVICES, 1)
    num = _int_var(env, ENV_NUM_PROCESSES, 1)
    pid = _int_var(env, ENV_PROCESS_ID, 0)
    coordinator = env.get(ENV_COORDINATOR, "").strip() or None

    auto_raw = env.get(ENV_AUTO, "")
    if auto_raw.strip().lower() not in _TRUE + _FALSE:
        raise ConfigError(f"{ENV_AUTO}={auto_raw!r} is not a boolean; set it to 1 or 0.")
    if auto_raw.strip().lower() in _TRUE:
        explicit = [
            f"{n}={env[n]!r}"
            for n in (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
            if env.get(n, "").strip()
        ]
        if explicit:
            raise ConfigError(
                f"{ENV_AUTO}=1 asks JAX to detect the cluster, but {', '.join(explicit)} "
                f"also describe it; unset {ENV_AUTO} or the explicit variables."
            )
        return Plan(mode="auto", num_processes=None, process_id=None, local_devices=local_devices)

    if num is None:
        stray = [f"{n}={env[n]!r}" for n in (ENV_COORDINATOR, ENV_PROCESS_ID) if env.get(n)]
        if stray:
            raise ConfigError(
                f"{', '.join(stray)} is set but {ENV_NUM_PROCESSES} is not; set "
                f"{ENV_NUM_PROCESSES} to the number of processes (or unset the others)."
            )
        return Plan(mode="single", local_devices=local_devices)

    if pid is not None and pid >= num:
        raise ConfigError(
            f"{ENV_PROCESS_ID}={pid} but {ENV_NUM_PROCESSES}={num}; process ids run from 0 "
            f"to {num - 1}, so set {ENV_PROCESS_ID} below {num} (or raise {ENV_NUM_PROCESSES})."
        )
    if num == 1:
        return Plan(mode="single", local_devices=local_devices)
    if pid is None:
        raise ConfigError(
            f"{ENV_NUM_PROCESSES}={num} but {ENV_PROCESS_ID} is not set; give each process "
            f"its index 0..{num - 1} (launch/multiprocess_cpu.sh does this)."
        )
    if coordinator is None:
        raise ConfigError(
            f"{ENV_NUM_PROCESSES}={num} but {ENV_COORDINATOR} is not set; set it to the "
            "host:port of process 0, the same value in every process, e.g. localhost:12355."
        )
    return Plan(
        mode="explicit",
        coordinator=_check_coordinator(coordinator),
        num_processes=num,
        process_id=pid,
        local_devices=local_devices,
    )


def initialize(env: Mapping[str, str] | None = None) -> None:
    """Joins the multi-process JAX cluster the launcher describes; a no-op for one process.

    Must run before any JAX computation (JAX fixes the device set when its backend starts).
    Safe to call more than once.
    """
    global _done
    if _done or jax.distributed.is_initialized():
        _done = True
        return
    plan = plan_from_env(env)

    if plan.local_devices is not None:
        try:
            jax.config.update("jax_num_cpu_devices", plan.local_devices)
        except RuntimeError as e:  # the backend already started with another device count
            raise ConfigError(
                f"{ENV_LOCAL_DEVICES}={plan.local_devices} cannot be applied because JAX is "
                "already running with a different CPU device count; call "
                "genctl_jax.parallel.distributed.initialize() before any JAX computation."
            ) from e

    if plan.mode != "single":
        # Cross-process collectives on the CPU backend need gloo; it only affects CPU devices.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if plan.mode == "explicit":
        jax.distributed.initialize(
            coordinator_address=plan.coordinator,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            # Explicit means explicit: don't let a detected SLURM/MPI/TPU env fill in gaps.
            cluster_detection_method="deactivate",
        )
    elif plan.mode == "auto":
        jax.distributed.initialize()
    _done = True


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process has reached `name`; a no-op with one process.

    Waits on the coordination service, not on a device collective: the CPU backend's gloo
    collectives give up when a process joins a device group more than 30 s after the others,
    and a process can be busy for longer. Use each name once per run.
    """
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))


def process_summary() -> str:
    """One log line: process index/count, local/global device counts and platform."""
    devices = jax.local_devices()
    kind = devices[0].device_kind if devices else "none"
    return (
        f"process {jax.process_index()}/{jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices, "
        f"platform={jax.default_backend()} ({kind})"
    )

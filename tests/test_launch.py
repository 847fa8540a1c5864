"""Launch scripts (dry runs, argument errors, a real two-process CPU cluster) and initialize()."""

import json
import os
import pathlib
import shlex
import socket
import subprocess
import sys
import time

import jax
import pytest
import yaml

from genctl_jax.errors import ConfigError
from genctl_jax.parallel import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
MULTIPROCESS = str(REPO / "launch" / "multiprocess_cpu.sh")
TPU_POD = str(REPO / "launch" / "tpu_pod.sh")
GKE = str(REPO / "launch" / "gke" / "launch.sh")

# Arguments that only survive correct quoting.
TRICKY = ["--config", "configs/a b.py", "it's", "$HOME", '"q" & \\ `x`']
# Prints its argv and one env var as JSON, so a test can check what a shell made of a command line.
ECHO_ARGV = [
    sys.executable,
    "-c",
    "import json, os, sys; "
    "print(json.dumps([sys.argv[1:], os.environ.get('GENCTL_AUTO_DISTRIBUTED')]))",
]


@pytest.fixture(autouse=True)
def no_real_cloud_tools(tmp_path_factory, monkeypatch):
    """Puts failing gcloud/kubectl first on PATH, so no test can reach a real cluster."""
    guard = tmp_path_factory.getbasetemp() / "guard_bin"
    if not guard.exists():
        guard.mkdir()
        for tool in ("gcloud", "kubectl"):
            (guard / tool).write_text(f"#!/bin/sh\necho 'test ran the real {tool}' >&2\nexit 99\n")
            (guard / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{guard}:{os.environ['PATH']}")


def run(*args, env=None, timeout=60):
    return subprocess.run(
        list(args), capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ dry runs


def test_multiprocess_dry_run_prints_one_command_per_process():
    r = run(MULTIPROCESS, "2", "--devices-per-process", "4", "--port", "1234", "--dry-run",
            "--", "python", "-m", "genctl_jax.train", *TRICKY)  # fmt: skip
    assert r.returncode == 0, r.stderr
    tail = (
        "python -m genctl_jax.train --config 'configs/a b.py' 'it'\\''s' '$HOME' '\"q\" & \\ `x`'"
    )
    assert r.stdout.splitlines() == [
        "env JAX_PLATFORMS=cpu GENCTL_COORDINATOR=localhost:1234 GENCTL_NUM_PROCESSES=2 "
        f"GENCTL_PROCESS_ID={i} GENCTL_LOCAL_DEVICES=4 {tail}"
        for i in range(2)
    ]
    assert shlex.split(r.stdout.splitlines()[1])[6:] == [
        "python",
        "-m",
        "genctl_jax.train",
        *TRICKY,
    ]


def test_tpu_pod_dry_run_quotes_the_remote_command(tmp_path):
    r = run(TPU_POD, "--tpu", "my-tpu", "--zone", "us-central2-b", "--project", "proj",
            "--dry-run", "--", "python", "-m", "genctl_jax.train", *TRICKY)  # fmt: skip
    assert r.returncode == 0, r.stderr
    remote = (
        'cd genctl_jax && export GENCTL_AUTO_DISTRIBUTED=1 PATH="$PWD/.venv/bin:$PATH" && '
        "python -m genctl_jax.train --config 'configs/a b.py' 'it'\\''s' '$HOME' "
        "'\"q\" & \\ `x`'"
    )
    local = shlex.split(r.stdout)
    assert local == [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone", "us-central2-b",
        "--project", "proj", "--worker=all", "--command", remote,
    ]  # fmt: skip
    assert r.stdout.count("\n") == 1

    # The remote string, run by a shell in the repo dir, gives back the exact argv.
    r = run(TPU_POD, "--tpu", "t", "--zone", "z", "--repo-dir", str(tmp_path), "--dry-run",
            "--", *ECHO_ARGV, *TRICKY)  # fmt: skip
    remote = shlex.split(r.stdout)[-1]
    out = subprocess.run(["bash", "-c", remote], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [TRICKY, "1"]


def test_tpu_pod_setup_then_run(tmp_path):
    opts = ["--tpu", "t", "--zone", "z", "--setup", "--repo-url", "https://example.com/r.git",
            "--ref", "main"]  # fmt: skip
    command = ["--", "python", "-m", "genctl_jax.train"]
    r = run(TPU_POD, *opts, "--dry-run", *command)
    assert r.returncode == 0, r.stderr
    setup, train = (shlex.split(line) for line in r.stdout.splitlines())
    assert setup[-1] == (
        "set -e; [ -d genctl_jax/.git ] || git clone --quiet https://example.com/r.git genctl_jax"
        "; cd genctl_jax; git fetch --quiet origin main; git checkout --quiet --detach FETCH_HEAD"
        "; make .venv/.installed; .venv/bin/python -m pip install --quiet"
        " \"jax[tpu]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
    )
    assert train[-1].endswith("&& python -m genctl_jax.train")

    # Without --dry-run the same two commands run; a stand-in gcloud records its argv.
    log = tmp_path / "gcloud.log"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    r = run(TPU_POD, *opts, *command, env=env)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls == [setup[1:], train[1:]]


def gke_dry_run(*command, extra=()):
    r = run(GKE, "--image", "us-docker.pkg.dev/p/r/genctl:1", "--tpu-type", "v5litepod-16",
            "--topology", "4x4", "--num-hosts", "4", "--name", "t-run", *extra, "--dry-run",
            "--", *command)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_gke_dry_run_renders_a_valid_jobset():
    out = gke_dry_run("python", "-m", "genctl_jax.train", *TRICKY, extra=["--max-restarts", "2"])
    lines = out.splitlines()
    assert lines[0] == "kubectl apply -f - <<'GENCTL_MANIFEST'"
    assert lines[-1] == "GENCTL_MANIFEST"
    # pyyaml comes with flax (a dependency), so the manifest is checked with a real YAML parser.
    doc = yaml.safe_load("\n".join(lines[1:-1]))
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert doc["kind"] == "JobSet"
    assert doc["metadata"]["name"] == "t-run"
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == 2
    [rjob] = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert (rjob["replicas"], job["parallelism"], job["completions"]) == (1, 4, 4)
    pod = job["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
        "cloud.google.com/gke-tpu-topology": "4x4",
    }
    [container] = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/genctl:1"
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert {"name": "GENCTL_AUTO_DISTRIBUTED", "value": "1"} in container["env"]
    assert container["command"][:2] == ["bash", "-c"]
    assert shlex.split(container["command"][2]) == ["python", "-m", "genctl_jax.train", *TRICKY]


def test_gke_command_survives_yaml_and_shell_and_reaches_kubectl(tmp_path):
    out = gke_dry_run(*ECHO_ARGV, *TRICKY, "line\nbreak")
    manifest = "\n".join(out.splitlines()[1:-1])
    command = yaml.safe_load(manifest)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"][
        "spec"
    ]["containers"][0]["command"]
    r = subprocess.run(command, capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == [[*TRICKY, "line\nbreak"], None]

    # Without --dry-run the same manifest goes to `kubectl apply -f -` on stdin.
    fake = tmp_path / "kubectl"
    fake.write_text(
        f"#!{sys.executable}\nimport sys\n"
        f"open({str(tmp_path / 'in.yaml')!r}, 'w').write(' '.join(sys.argv[1:]) + '\\n' "
        "+ sys.stdin.read())\n"
    )
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    r = run(GKE, "--image", "us-docker.pkg.dev/p/r/genctl:1", "--tpu-type", "v5litepod-16",
            "--topology", "4x4", "--num-hosts", "4", "--name", "t-run", "--",
            *ECHO_ARGV, *TRICKY, "line\nbreak", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "in.yaml").read_text() == "apply -f -\n" + manifest + "\n"


@pytest.mark.parametrize(
    ("tpu_type", "topology", "hosts", "accelerator", "chips_per_host"),
    [
        ("v4-16", "2x2x2", "2", "tpu-v4-podslice", 4),
        ("v5p-32", "2x2x4", "4", "tpu-v5p-slice", 4),
        ("v6e-8", "2x4", "1", "tpu-v6e-slice", 8),
    ],
)
def test_gke_tpu_types(tpu_type, topology, hosts, accelerator, chips_per_host):
    r = run(GKE, "--image", "img", "--tpu-type", tpu_type, "--topology", topology,
            "--num-hosts", hosts, "--name", "x", "--dry-run", "--", "true")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load("\n".join(r.stdout.splitlines()[1:-1]))
    pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == accelerator
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == chips_per_host


# -------------------------------------------------------------------------------- bad input

GKE_OK = ["--image", "img", "--tpu-type", "v5litepod-16", "--topology", "4x4", "--num-hosts", "4"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([MULTIPROCESS], "missing N"),
        ([MULTIPROCESS, "--", "x"], "missing N"),
        ([MULTIPROCESS, "2", "--bogus", "--", "x"], "unknown option '--bogus'"),
        ([MULTIPROCESS, "2"], "no command"),
        ([MULTIPROCESS, "2", "--"], "no command"),
        ([MULTIPROCESS, "0", "--", "x"], "N must be an integer >= 1, got '0'"),
        ([MULTIPROCESS, "2", "x"], "unexpected argument 'x'"),
        ([MULTIPROCESS, "2", "--port"], "--port needs a value"),
        ([MULTIPROCESS, "2", "--port", "70000", "--", "x"], "--port must be"),
        ([MULTIPROCESS, "2", "--devices-per-process", "a", "--", "x"], "--devices-per-process"),
        ([TPU_POD, "--zone", "z", "--", "x"], "missing --tpu"),
        ([TPU_POD, "--tpu", "t", "--", "x"], "missing --zone"),
        ([TPU_POD, "--tpu", "t", "--zone", "z"], "no command"),
        ([TPU_POD, "--tpu", "t", "--zone", "z", "--workers", "1", "--", "x"], "unknown option"),
        ([TPU_POD, "--tpu", "t", "--zone", "z", "--ref", "main", "--", "x"], "only apply with"),
        ([GKE, *GKE_OK], "no command"),
        ([GKE, *GKE_OK[2:], "--", "x"], "missing --image"),
        ([GKE, *GKE_OK, "--nodes", "4", "--", "x"], "unknown option '--nodes'"),
        ([GKE, *GKE_OK[:-1], "3", "--", "x"], "--num-hosts 3 does not divide the 16 chips"),
        ([GKE, *GKE_OK[:5], "4x2", *GKE_OK[6:], "--", "x"], "has 8 chips but --tpu-type"),
        ([GKE, *GKE_OK[:3], "v3-8", *GKE_OK[4:], "--", "x"], "--tpu-type 'v3-8' is not one"),
        ([GKE, *GKE_OK, "--name", "Bad_Name", "--", "x"], "--name 'Bad_Name'"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message):
    r = run(*argv)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and message in r.stderr and "usage: launch/" in r.stderr


@pytest.mark.parametrize("script", [MULTIPROCESS, TPU_POD, GKE])
def test_help(script):
    r = run(script, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: launch/")


# ------------------------------------------------------------------ real multi-process runs

TWO_PROCESS_CHECK = """
from genctl_jax.parallel import distributed
distributed.initialize()
distributed.initialize()  # idempotent
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
pid = jax.process_index()
# Process 0 holds 1..4 and process 1 holds 5..8: the sum 36 needs data from both.
local = np.arange(1, 5, dtype=np.float32) + 4 * pid
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, (8,))
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
ids = multihost_utils.process_allgather(np.int32(pid))
print("SUMMARY", distributed.process_summary())
print("RESULT", pid, float(total), ids.tolist())
"""


def test_two_cpu_processes_run_a_cross_process_collective():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    r = run(MULTIPROCESS, "2", "--devices-per-process", "4", "--port", str(free_port()),
            "--", sys.executable, "-c", TWO_PROCESS_CHECK, env=env, timeout=120)  # fmt: skip
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stdout + r.stderr
    results = sorted(line for line in r.stdout.splitlines() if "RESULT" in line)
    assert results == ["[0] RESULT 0 36.0 [0, 1]", "[1] RESULT 1 36.0 [0, 1]"], r.stdout
    assert "[1] SUMMARY process 1/2: 4 local / 8 global devices, platform=cpu" in r.stdout
    print(f"two-process run took {elapsed:.1f} s")


def test_one_failing_process_stops_the_others_and_sets_the_exit_status(tmp_path):
    # Process 1 fails at once; process 0 would otherwise sleep for a minute.
    script = (
        "import os, sys, time\n"
        "if os.environ['GENCTL_PROCESS_ID'] == '1': sys.exit(3)\n"
        "print('waiting', flush=True); time.sleep(60)\n"
    )
    start = time.monotonic()
    r = run(MULTIPROCESS, "2", "--log-dir", str(tmp_path), "--",
            sys.executable, "-c", script)  # fmt: skip
    assert r.returncode == 3
    assert time.monotonic() - start < 30
    assert "process 1 exited with status 3" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["process_0.log", "process_1.log"]


# ------------------------------------------------------------------------------ initialize()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"GENCTL_NUM_PROCESSES": "2", "GENCTL_PROCESS_ID": "2", "GENCTL_COORDINATOR": "h:1"},
         "GENCTL_PROCESS_ID=2 but GENCTL_NUM_PROCESSES=2; process ids run from 0 to 1"),
        ({"GENCTL_NUM_PROCESSES": "2", "GENCTL_PROCESS_ID": "0"},
         "GENCTL_COORDINATOR is not set; set it to the host:port of process 0"),
        ({"GENCTL_NUM_PROCESSES": "2", "GENCTL_COORDINATOR": "h:1"},
         "GENCTL_NUM_PROCESSES=2 but GENCTL_PROCESS_ID is not set"),
        ({"GENCTL_PROCESS_ID": "0", "GENCTL_COORDINATOR": "h:1"},
         "is set but GENCTL_NUM_PROCESSES is not"),
        ({"GENCTL_NUM_PROCESSES": "two"}, "GENCTL_NUM_PROCESSES='two' is not an integer >= 1"),
        ({"GENCTL_NUM_PROCESSES": "0"}, "GENCTL_NUM_PROCESSES='0' is not an integer >= 1"),
        ({"GENCTL_NUM_PROCESSES": "2", "GENCTL_PROCESS_ID": "-1", "GENCTL_COORDINATOR": "h:1"},
         "GENCTL_PROCESS_ID='-1' is not an integer >= 0"),
        ({"GENCTL_NUM_PROCESSES": "2", "GENCTL_PROCESS_ID": "0", "GENCTL_COORDINATOR": "host"},
         "GENCTL_COORDINATOR='host' is not host:port"),
        ({"GENCTL_LOCAL_DEVICES": "0"}, "GENCTL_LOCAL_DEVICES='0' is not an integer >= 1"),
        ({"GENCTL_AUTO_DISTRIBUTED": "maybe"}, "GENCTL_AUTO_DISTRIBUTED='maybe' is not a boolean"),
        ({"GENCTL_AUTO_DISTRIBUTED": "1", "GENCTL_NUM_PROCESSES": "4"},
         "GENCTL_NUM_PROCESSES='4' also describe it; unset GENCTL_AUTO_DISTRIBUTED"),
    ],
)  # fmt: skip
def test_plan_errors_name_variable_value_and_fix(env, message):
    with pytest.raises(ConfigError) as e:
        distributed.plan_from_env(env)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("env", "plan"),
    [
        ({}, distributed.Plan("single")),
        ({"GENCTL_NUM_PROCESSES": "1", "GENCTL_LOCAL_DEVICES": "8"},
         distributed.Plan("single", local_devices=8)),
        ({"GENCTL_NUM_PROCESSES": "4", "GENCTL_PROCESS_ID": "3", "GENCTL_COORDINATOR": "h:99"},
         distributed.Plan("explicit", "h:99", 4, 3)),
        ({"GENCTL_AUTO_DISTRIBUTED": "1"}, distributed.Plan("auto", None, None, None)),
        ({"GENCTL_AUTO_DISTRIBUTED": "0"}, distributed.Plan("single")),
    ],
)  # fmt: skip
def test_plan(env, plan):
    assert distributed.plan_from_env(env) == plan


@pytest.fixture
def fake_jax(monkeypatch):
    """Records jax.distributed.initialize and jax.config.update calls instead of making them."""
    calls = []
    monkeypatch.setattr(distributed, "_done", False)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(("init", kw)))
    monkeypatch.setattr(jax.config, "update", lambda k, v: calls.append(("config", k, v)))
    return calls


def test_initialize_explicit_calls_jax_once(fake_jax):
    env = {"GENCTL_NUM_PROCESSES": "2", "GENCTL_PROCESS_ID": "1", "GENCTL_COORDINATOR": "h:9",
           "GENCTL_LOCAL_DEVICES": "4"}  # fmt: skip
    distributed.initialize(env)
    distributed.initialize(env)
    assert fake_jax == [
        ("config", "jax_num_cpu_devices", 4),
        ("config", "jax_cpu_collectives_implementation", "gloo"),
        ("init", {"coordinator_address": "h:9", "num_processes": 2, "process_id": 1,
                  "cluster_detection_method": "deactivate"}),
    ]  # fmt: skip


def test_initialize_auto_lets_jax_detect_the_cluster(fake_jax):
    distributed.initialize({"GENCTL_AUTO_DISTRIBUTED": "1"})
    assert fake_jax == [
        ("config", "jax_cpu_collectives_implementation", "gloo"),
        ("init", {}),
    ]


def test_initialize_single_process_is_a_no_op(fake_jax):
    distributed.initialize({})
    assert fake_jax == []


def test_local_devices_after_jax_started_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(distributed, "_done", False)
    assert jax.device_count() == 8  # conftest's 8 CPU devices; the backend is now running
    distributed.initialize({"GENCTL_LOCAL_DEVICES": "8"})  # same count: fine
    monkeypatch.setattr(distributed, "_done", False)
    with pytest.raises(ConfigError, match="GENCTL_LOCAL_DEVICES=3 cannot be applied"):
        distributed.initialize({"GENCTL_LOCAL_DEVICES": "3"})


def test_process_summary():
    assert distributed.process_summary().startswith(
        "process 0/1: 8 local / 8 global devices, platform=cpu"
    )

"""Config loading, variants, overrides and validation errors."""

import pathlib
import re
import subprocess
import sys

import pytest

from genctl_jax import configlib
from genctl_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.py"))


def tiny(name="shapes_autoencoder.py"):
    return configlib.load_config(f"{REPO / 'configs' / name}:tiny")


# Recipes of frozen pretrained encoders take the encoder's directory.
PRETRAINED = {"t2i_t5.py": "t5", "t2i_clip.py": "clip"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_validates_its_tiny_variant(path, request):
    arg = "tiny"
    if path.name in PRETRAINED:
        encoders = request.getfixturevalue("pretrained_encoders")
        arg += f",encoder={encoders[PRETRAINED[path.name]]}"
    if path.name == "shapes_controlnet.py":  # Trains on a text-to-image run's frozen UNet.
        arg += f",base={request.getfixturevalue('tiny_t2i_base')}"
    config = configlib.load_config(f"{path}:{arg}")
    configlib.validate(config, num_devices=8, process_count=1)
    # The docstring holds the exact launch command.
    text = path.read_text()
    assert f"--config configs/{path.name}" in text
    assert "python -m genctl_jax.train" in text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_its_default_variant(path):
    config = configlib.load_config(str(path))
    assert config.task.name and config.model.name


def test_parse_arg_types_flags_and_rejects_unknown_keys():
    arg = configlib.parse_arg("tiny,res=64,lr=0.5,name=x", tiny=False, res=32, lr=1.0, name="")
    assert (arg.tiny, arg.res, arg.lr, arg.name) == (True, 64, 0.5, "x")
    assert configlib.parse_arg(None, tiny=False).tiny is False
    with pytest.raises(ConfigError, match=r"'bogus'.*accepted: res, tiny"):
        configlib.parse_arg("bogus=1", tiny=False, res=32)
    with pytest.raises(ConfigError, match=r"res='big': expected a int"):
        configlib.parse_arg("res=big", res=32)
    with pytest.raises(ConfigError, match="needs a value"):
        configlib.parse_arg("res", res=32)


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="does not exist"):
        configlib.load_config("configs/nope.py:tiny")


def _expect(config, pattern, num_devices=8):
    with pytest.raises(ConfigError, match=pattern):
        configlib.validate(config, num_devices=num_devices, process_count=1)


def test_batch_not_divisible_by_data_parallel_devices():
    c = tiny()
    c.data.batch_size = 12
    c.mesh.fsdp = 8
    _expect(c, r"config\.data\.batch_size=12 is not divisible by the 8 batch shards")


def test_mesh_that_does_not_match_the_device_count():
    c = tiny()
    c.mesh.data, c.mesh.fsdp = 2, 2
    _expect(c, r"config\.mesh=data=2,fsdp=2,tensor=1 needs 4 devices but 8 are present")
    c.mesh.data = -1
    c.mesh.fsdp = 3
    _expect(c, r"fixed axes \(3 devices\) do not divide the 8 devices")
    c.mesh.fsdp = -1
    _expect(c, "only one axis may be -1")
    c = tiny()
    c.mesh.pipeline = 2
    _expect(c, r"unknown axes \['pipeline'\]")


def test_rules_naming_an_unknown_mesh_axis():
    c = tiny()
    c.sharding.rules = (("embed", "model"),) + tuple(c.sharding.rules[1:])
    _expect(c, r"logical axis 'embed' maps to unknown mesh axis 'model'")


def test_missing_dataset(tmp_path):
    c = tiny()
    c.data.name = f"folder:{tmp_path / 'nowhere'}"
    _expect(c, "does not exist")
    c.data.name = "tfds:no_such_dataset_xyz"
    _expect(c, "no_such_dataset_xyz")
    c.data.name = "imagenet"
    _expect(c, "config.data.name")


def test_trainer_fields():
    c = tiny()
    c.trainer.grad_accum_steps = 3
    _expect(c, r"grad_accum_steps=3 does not divide the per-shard batch of 2")
    c = tiny()
    c.trainer.num_train_steps = 0
    _expect(c, r"num_train_steps=0: expected an integer >= 1")
    c = tiny()
    c.trainer.ema_decay = 1.0
    _expect(c, "ema_decay=1.0")


def test_model_task_and_optimizer_fields():
    c = tiny()
    c.model.name = "unet9000"
    _expect(c, r"config\.model\.name='unet9000' is not a known model; accepted: autoencoder")
    c = tiny()
    c.task.name = "gan9000"
    _expect(c, r"config\.task\.name='gan9000'")
    c = tiny()
    c.data.image_size = 17
    _expect(c, r"image_size=17 is not divisible by 2")
    c = tiny()
    c.optimizers.model.name = "adagrad9"
    _expect(c, r"config\.optimizers\.model\.name='adagrad9': accepted adam, adamw, sgd")
    c = tiny()
    c.optimizers.model.weight_decay = 0.1
    _expect(c, r"weight_decay=0.1 only applies to name='adamw' \(got 'adam'\)")
    c = tiny()
    c.optimizers.model.b2 = 1.0
    _expect(c, r"config\.optimizers\.model\.b2=1.0: expected 0 <= b2 < 1")
    c = tiny()
    del c.optimizers["model"]
    c.optimizers.generator = c.optimizers.get("generator", {})
    _expect(c, r"config\.optimizers has blocks for \['generator'\]")


def test_command_line_overrides_and_clean_error(tmp_path):
    """`--config.a.b=value` reaches the config; a bad value ends in one readable line."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "genctl_jax.train",
            "--config",
            "configs/shapes_autoencoder.py:tiny",
            "--workdir",
            str(tmp_path / "w"),
            "--config.data.batch_size=12",
            "--config.data.num_epochs=2",  # a None-default (placeholder) field takes a value
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: config\.data\.batch_size=12 is not divisible .*", last), last
    assert not (tmp_path / "w").exists()  # nothing written before validation passed

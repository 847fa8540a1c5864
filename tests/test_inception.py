"""FID Inception: parity with pytorch-fid on random weights, weight conversion, refusals.

The reference is pytorch-fid's own `InceptionV3(output_blocks=[3])` (use_fid_inception,
resize_input and normalize_input on), built with its weight download replaced by a
random state dict (BatchNorm statistics random too), saved as a .pth and converted by
`genctl_jax.convert_fid_inception`. torch / torchvision / pytorch_fid are imported inside
the tests that need them, so the rest of the suite runs without them.
"""

import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from genctl_jax import configlib
from genctl_jax import convert_fid_inception as converter
from genctl_jax.errors import CheckpointError, ConfigError
from genctl_jax.models import inception
from genctl_jax.parallel import mesh as mesh_lib

BATCH, SIZE = 4, 64  # Every forward sees this shape (64 -> 299 covers the resize).
ATOL = RTOL = 1e-4  # Parity tolerance on float32 pool features and logits.


def _torch_modules():
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    return torch, torchvision, pytorch_fid_inception


def _random_state_dict(torch, torchvision):
    """A random FID-Inception state dict whose activations stay O(1) through the network.

    torchvision's InceptionV3 with 1008 classes and no aux head has exactly the keys and
    shapes of pytorch-fid's `fid_inception_v3()` (its FID blocks only change `forward`).
    """
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    generator = torch.Generator().manual_seed(0)
    state = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            if key.endswith("conv.weight"):  # He-normal keeps the ReLU stack's scale.
                value.normal_(0.0, (2.0 / value[0].numel()) ** 0.5, generator=generator)
            elif key.endswith("bn.weight"):
                value.uniform_(0.5, 1.5, generator=generator)
            elif key.endswith(("bn.bias", "running_mean")):
                value.normal_(0.0, 0.2, generator=generator)
            elif key.endswith("running_var"):
                value.uniform_(0.5, 2.0, generator=generator)
            elif key.endswith("num_batches_tracked"):
                value.fill_(12345)
            elif key == "fc.weight":
                value.normal_(0.0, 2048**-0.5, generator=generator)
            elif key == "fc.bias":
                value.normal_(0.0, 1.0, generator=generator)
            else:
                raise AssertionError(f"unexpected key {key}")
    return state


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(pth path, converted safetensors path, torch state dict) of random FID weights."""
    torch, torchvision, _ = _torch_modules()
    directory = tmp_path_factory.mktemp("fid_inception")
    state = _random_state_dict(torch, torchvision)
    pth = directory / "random_inception.pth"
    torch.save(state, pth)
    converted = converter.convert(pth, directory / "fid_inception.safetensors")
    return pth, converted, state


def _mesh():
    """data=2 x fsdp=2 over 4 of the 8 CPU devices: the batch of 4 splits one image each."""
    return mesh_lib.create_mesh(
        ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 1}), jax.devices()[:4]
    )


def _images():
    return np.random.default_rng(0).random((BATCH, SIZE, SIZE, 3), dtype=np.float32)


def test_parity_with_pytorch_fid_on_a_mesh(checkpoint, monkeypatch):
    torch, _, pytorch_fid_inception = _torch_modules()
    pth, converted, state = checkpoint
    # pytorch-fid's own network, loading (strictly) our random weights instead of downloading.
    monkeypatch.setattr(
        pytorch_fid_inception,
        "load_state_dict_from_url",
        lambda *args, **kwargs: torch.load(pth, weights_only=True),
    )
    reference = pytorch_fid_inception.InceptionV3(
        [3], resize_input=True, normalize_input=True, use_fid_inception=True
    ).eval()
    images = _images()
    with torch.no_grad():
        pool = reference(torch.from_numpy(images).permute(0, 3, 1, 2))[0].flatten(1)
        weight, bias = state["fc.weight"], state["fc.bias"]
        want = {
            "pool": pool.numpy(),
            "logits_unbiased": (pool @ weight.T).numpy(),
            "logits": torch.nn.functional.linear(pool, weight, bias).numpy(),
        }
    # Guard against a degenerate reference (all-zero or saturated features).
    assert want["pool"].shape == (BATCH, 2048)
    assert 0.1 < want["pool"].std() < 10 and (want["pool"] > 0).mean() > 0.5

    mesh = _mesh()
    params = inception.load_params(converted, mesh=mesh)
    out = inception.extract_features(params, images, input_range=(0, 1), mesh=mesh)
    for name, expected in want.items():
        got = np.asarray(getattr(out, name))
        assert got.shape == expected.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL, err_msg=name)
    # The batch stays split over data x fsdp: one image per device.
    assert out.pool.sharding.spec[0] == ("data", "fsdp")
    assert {s.data.shape for s in out.pool.addressable_shards} == {(1, 2048)}

    # Parameters sharded by the project's rules (conv output channels over fsdp) give the
    # same features; bfloat16 compute stays close.
    sharded = inception.load_params(converted, mesh=mesh, rules=configlib.DEFAULT_RULES)
    kernel = sharded["Mixed_7c"]["branch_pool"]["conv"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    again = inception.extract_features(sharded, images, input_range=(0, 1), mesh=mesh)
    np.testing.assert_allclose(np.asarray(again.pool), want["pool"], atol=ATOL, rtol=RTOL)
    half = inception.extract_features(
        params, images, input_range=(0, 1), dtype="bfloat16", mesh=mesh
    )
    assert half.pool.dtype == np.float32
    error = np.abs(np.asarray(half.pool) - want["pool"]).max() / np.abs(want["pool"]).max()
    assert 0 < error < 0.02, error


@pytest.mark.parametrize("size", [(37, 50), (317, 400), (299, 299)])
def test_resize_matches_torch_interpolate(size):
    """Upsampling, downsampling (no antialiasing) and the identity, as F.interpolate does."""
    torch = pytest.importorskip("torch")
    images = np.random.default_rng(1).random((2, *size, 3), dtype=np.float32)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2),
        size=(299, 299),
        mode="bilinear",
        align_corners=False,
    ).permute(0, 2, 3, 1)
    got = jax.jit(inception.resize_bilinear, static_argnums=1)(images, (299, 299))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-6, rtol=0)


def test_input_ranges_agree():
    """The same picture as uint8 [0, 255], float [0, 1] and float [-1, 1] gives one input."""
    pixels = np.random.default_rng(2).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    unit = pixels.astype(np.float32) / 255.0
    results = [
        np.asarray(jax.jit(inception.preprocess, static_argnums=1)(images, input_range))
        for images, input_range in (
            (pixels, (0, 255)),
            (unit, (0, 1)),
            (unit * 2 - 1, (-1, 1)),
        )
    ]
    assert results[0].shape == (2, 299, 299, 3)
    assert results[0].min() >= -1 and results[0].max() <= 1 and results[0].std() > 0.2
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match=r"input_range=\(0, 2\).*accepted: \(-1, 1\)"):
        inception.FIDInceptionV3(input_range=(0, 2))
    with pytest.raises(ValueError, match=r"NHWC.*\(2, 3, 20, 24\)"):
        inception.preprocess(np.zeros((2, 3, 20, 24), np.float32))
    with pytest.raises(ValueError, match="data x fsdp = 4 devices; use a multiple of 4"):
        inception.extract_features({}, np.zeros((3, 8, 8, 3), np.float32), mesh=_mesh())


def test_conversion_round_trips_exactly(checkpoint, tmp_path):
    torch, torchvision, _ = _torch_modules()
    pth, converted, state = checkpoint
    # The safetensors file holds the .pth's tensors, names and values unchanged.
    written = safetensors.numpy.load_file(converted)
    assert set(written) == set(state)
    for key, value in state.items():
        assert written[key].dtype == value.numpy().dtype
        np.testing.assert_array_equal(written[key], value.numpy(), err_msg=key)
    with safetensors.safe_open(converted, "np") as f:
        assert f.metadata()["source_sha256"] == converter._sha256(pth)

    # Flax params -> state dict gives every weight back bit for bit...
    params = inception.load_params(converted)
    exported = inception.export_state_dict(params)
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert set(exported) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(exported[key], value.numpy(), err_msg=key)
    # ... which torch loads strictly, and save_params writes a file that loads the same.
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    )
    model.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in exported.items()}, strict=True
    )
    saved = inception.save_params(tmp_path / "saved.safetensors", params)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        inception.save_params(saved, params)
    reloaded = inception.load_params(saved)
    jax.tree.map(np.testing.assert_array_equal, reloaded, params)

    # The converter refuses to replace its output unless told to.
    with pytest.raises(CheckpointError, match=f"{converted} exists; pass --overwrite"):
        converter.convert(pth, converted)
    assert converter.convert(pth, converted, overwrite=True) == converted


def test_converter_lists_bad_keys(tmp_path):
    torch, torchvision, _ = _torch_modules()
    state = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=False
    ).state_dict()
    del state["Mixed_6b.branch7x7_2.conv.weight"]
    state["AuxLogits.fc.weight"] = torch.zeros(1008, 768)
    state["fc.weight"] = torch.zeros(1000, 2048)
    pth = tmp_path / "wrong.pth"
    torch.save(state, pth)
    with pytest.raises(CheckpointError) as error:
        converter.convert(pth, tmp_path / "out.safetensors")
    message = str(error.value)
    assert "1 missing: Mixed_6b.branch7x7_2.conv.weight" in message
    assert "1 unexpected: AuxLogits.fc.weight" in message
    assert "fc.weight (1000, 2048) (expected (1008, 2048))" in message
    assert not (tmp_path / "out.safetensors").exists()


def _zero_state_dict():
    shapes = nn.unbox(inception.abstract_params())
    return inception.export_state_dict(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))


def test_load_lists_wrong_and_missing_keys(tmp_path):
    state = _zero_state_dict()
    assert len(state) == 472 and state["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    del state["Mixed_5b.branch_pool.bn.running_var"]
    del state["fc.bias"]
    state["Mixed_5b.branch_pool.bn.running_variance"] = np.ones(32, np.float32)
    state["Mixed_7c.branch1x1.conv.weight"] = np.zeros((320, 2048, 3, 3), np.float32)
    state["Mixed_7c.branch1x1.bn.num_batches_tracked"] = np.array(3)  # Ignored.
    path = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(state, path)
    with pytest.raises(CheckpointError) as error:
        inception.load_params(path)
    message = str(error.value)
    assert str(path) in message
    assert "2 missing: Mixed_5b.branch_pool.bn.running_var, fc.bias" in message
    assert "1 unexpected: Mixed_5b.branch_pool.bn.running_variance" in message
    assert (
        "1 wrong shape: Mixed_7c.branch1x1.conv.weight (320, 2048, 3, 3) "
        "(expected (320, 2048, 1, 1))" in message
    )


def test_missing_or_unreadable_weights_say_where_to_get_them(tmp_path):
    missing = tmp_path / "fid_inception.safetensors"
    with pytest.raises(CheckpointError) as error:
        inception.load_params(missing)
    message = str(error.value)
    assert str(missing) in message and inception.FID_WEIGHTS_URL in message
    assert f"python -m genctl_jax.convert_fid_inception --input {inception.FID_WEIGHTS_NAME}" in (
        message
    )
    with pytest.raises(CheckpointError, match="never unpickles.*convert_fid_inception"):
        inception.load_params(tmp_path / inception.FID_WEIGHTS_NAME)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        inception.load_params(garbage)

    with pytest.raises(CheckpointError, match="does not exist.*releases/download/fid_weights"):
        converter.convert(tmp_path / "nothing.pth", tmp_path / "out.safetensors")
    # A file named with torch hub's hash suffix must have that hash (checked before torch).
    truncated = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    truncated.write_bytes(b"truncated download")
    with pytest.raises(CheckpointError, match="its name says 6726825d"):
        converter.convert(truncated, tmp_path / "out.safetensors")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"")
    with pytest.raises(CheckpointError, match="exists; pass --overwrite"):
        converter.convert(truncated, existing)


def test_converter_command_line_reports_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "genctl_jax.convert_fid_inception"]
        + ["--input", str(tmp_path / "missing.pth"), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert f"error: {tmp_path / 'missing.pth'} does not exist" in result.stderr
    assert inception.FID_WEIGHTS_URL in result.stderr

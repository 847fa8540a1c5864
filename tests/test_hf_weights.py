"""Safetensors import/export: layouts, sharded indexes, lazy bf16 reads, refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from genctl_jax.errors import CheckpointError
from genctl_jax.io import hf_weights
from genctl_jax.io.hf_weights import Tensor

# A torch "model": Linear(6 -> 2 heads x 4), Conv2d(3 -> 8, 3x3), a per-head bias, a table.
TORCH = {
    "proj.weight": torch.arange(48, dtype=torch.float32).reshape(8, 6) / 10,
    "conv.weight": torch.arange(216, dtype=torch.float32).reshape(8, 3, 3, 3) / 100,
    "proj.bias": torch.arange(8, dtype=torch.float32),
    "table.weight": torch.arange(20, dtype=torch.float32).reshape(5, 4),
}
MAP = [
    Tensor(("proj", "kernel"), "proj.weight", "linear"),
    Tensor(("conv", "kernel"), "conv.weight", "conv"),
    Tensor(("proj", "bias"), "proj.bias", "vector"),
    Tensor(("table",), ("missing.alias", "table.weight")),
]
ABSTRACT = {
    "proj": {
        "kernel": jax.ShapeDtypeStruct((6, 2, 4), jnp.float32),
        "bias": jax.ShapeDtypeStruct((2, 4), jnp.float32),
    },
    "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 8), jnp.float32)},
    "table": jax.ShapeDtypeStruct((5, 4), jnp.float32),
}


def write(directory, tensors=TORCH, name="model.safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(tensors, str(directory / name))
    return directory


def test_layouts_match_torch_semantics(tmp_path):
    params = hf_weights.import_params(
        MAP, hf_weights.open_checkpoint(write(tmp_path)), ABSTRACT, source="t"
    )
    x = np.linspace(-1, 1, 6, dtype=np.float32)
    expected = TORCH["proj.weight"].numpy() @ x + TORCH["proj.bias"].numpy()
    got = np.einsum("i,ihd->hd", x, params["proj"]["kernel"]) + params["proj"]["bias"]
    np.testing.assert_allclose(got.reshape(-1), expected, rtol=1e-6)
    # conv: torch OIHW cross-correlation == Flax HWIO on NHWC.
    image = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.conv2d(image, TORCH["conv.weight"]).numpy().transpose(0, 2, 3, 1)
    ours = jax.lax.conv_general_dilated(
        image.numpy().transpose(0, 2, 3, 1),
        params["conv"]["kernel"],
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(params["table"], TORCH["table.weight"].numpy())
    # Export inverts import exactly, writing the first key of each entry.
    exported = hf_weights.export_params(MAP, params)
    assert set(exported) == {"proj.weight", "conv.weight", "proj.bias", "missing.alias"}
    np.testing.assert_array_equal(exported["conv.weight"], TORCH["conv.weight"].numpy())
    np.testing.assert_array_equal(exported["proj.weight"], TORCH["proj.weight"].numpy())
    np.testing.assert_array_equal(exported["proj.bias"], TORCH["proj.bias"].numpy())


def test_sharded_index_bf16_and_placement(tmp_path):
    # Two shards with an index, one tensor in bfloat16 (read without torch or ml frameworks).
    first = {k: TORCH[k] for k in ("proj.weight", "proj.bias")}
    second = {k: TORCH[k] for k in ("conv.weight", "table.weight")}
    second["conv.weight"] = second["conv.weight"].bfloat16()
    write(tmp_path, first, "model-00001-of-00002.safetensors")
    write(tmp_path, second, "model-00002-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in first}
    weight_map |= {k: "model-00002-of-00002.safetensors" for k in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    checkpoint = hf_weights.open_checkpoint(tmp_path)
    assert len(checkpoint.files) == 2
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    shardings = jax.tree.map(lambda _: NamedSharding(mesh, P()), ABSTRACT)
    shardings["conv"]["kernel"] = NamedSharding(mesh, P(None, None, None, "fsdp"))
    params = hf_weights.import_params(MAP, checkpoint, ABSTRACT, shardings)
    kernel = params["conv"]["kernel"]
    assert kernel.dtype == jnp.float32
    assert kernel.addressable_shards[0].data.shape == (3, 3, 3, 1)
    expected = second["conv.weight"].float().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(kernel), expected)


def test_save_refuses_overwrite_and_round_trips(tmp_path):
    tensors = {k: v.numpy() for k, v in TORCH.items()}
    path = hf_weights.save_checkpoint(tmp_path, tensors, {"model_type": "toy"})
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        hf_weights.save_checkpoint(tmp_path, tensors, {"model_type": "toy"})
    reread = safetensors.torch.load_file(str(path))
    assert all(torch.equal(reread[k], TORCH[k]) for k in TORCH)
    assert hf_weights.read_config(tmp_path) == {"model_type": "toy"}


def test_refusals(tmp_path):
    (tmp_path / "pickled").mkdir()
    torch.save(TORCH, tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles.*safe_serialization=True"):
        hf_weights.open_checkpoint(tmp_path / "pickled")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor"):
        hf_weights.open_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="nor a model in the local Hugging Face cache"):
        hf_weights.open_checkpoint("no-such-org/no-such-model")

    partial = {k: v for k, v in TORCH.items() if k != "proj.bias"}
    checkpoint = hf_weights.open_checkpoint(write(tmp_path / "partial", partial))
    with pytest.raises(CheckpointError, match=r"'proj.bias' is missing \(expected shape \(8,\)"):
        hf_weights.import_params(MAP, checkpoint, ABSTRACT)
    wrong = dict(TORCH, **{"proj.weight": torch.zeros(8, 5)})
    checkpoint = hf_weights.open_checkpoint(write(tmp_path / "wrong", wrong))
    with pytest.raises(
        CheckpointError, match=r"'proj.weight' has shape \(8, 5\), expected \(8, 6\)"
    ):
        hf_weights.import_params(MAP, checkpoint, ABSTRACT)

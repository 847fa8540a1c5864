"""Convert pytorch-fid's FID Inception weights (.pth) to safetensors, once.

  python -m genctl_jax.convert_fid_inception \
      --input pt_inception-2015-12-05-6726825d.pth --output fid_inception.safetensors

The input is pytorch-fid's release file (from `models.inception.FID_WEIGHTS_URL`), a
state dict of `fid_inception_v3()`. It is read with `torch.load(weights_only=True)` (no
arbitrary unpickling; needs torch, which genctl_jax does not otherwise), checked key by
key, and written as safetensors with the state-dict key names and values unchanged.
`genctl_jax.models.inception.load_params(output)` then reads it without torch. When the
file name carries torch hub's hash suffix (`-6726825d.pth`), the file's SHA-256 must
start with it, so a truncated or different download is caught here.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from absl import app, flags

from genctl_jax import cli
from genctl_jax.errors import CheckpointError

FLAGS = flags.FLAGS
# torch hub's convention: NAME-<first hex digits of the file's sha256>.EXT
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z]+$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert(input_path: str | Path, output_path: str | Path, *, overwrite: bool = False) -> Path:
    """Writes the safetensors copy of a pytorch-fid FID Inception .pth; returns its path."""
    from genctl_jax.models import inception

    input_path, output_path = Path(input_path).expanduser(), Path(output_path).expanduser()
    if not input_path.is_file():
        raise CheckpointError(
            f"{input_path} does not exist. Download pytorch-fid's FID Inception weights "
            f"from {inception.FID_WEIGHTS_URL} and pass that file as --input"
        )
    if output_path.exists() and not overwrite:
        raise CheckpointError(f"{output_path} exists; pass --overwrite to replace it")
    sha256 = _sha256(input_path)
    named = _HASH_IN_NAME.search(input_path.name)
    if named and not sha256.startswith(named.group(1)):
        raise CheckpointError(
            f"{input_path}: its SHA-256 starts with {sha256[:8]}, but its name says "
            f"{named.group(1)}: the download is incomplete or not that file. Download it "
            f"again from {inception.FID_WEIGHTS_URL} (or rename the file if you mean to "
            f"convert other weights)"
        )
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            "reading a .pth needs torch (pip install torch); it is needed for this one-off "
            "conversion only"
        ) from None
    try:
        state = torch.load(input_path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and containers.
        raise CheckpointError(
            f"{input_path} cannot be read as a torch state dict with weights_only=True "
            f"({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(
            f"{input_path} does not hold a state dict (a mapping of names to tensors); "
            f"found {type(state).__name__}"
        )
    inception.check_state_dict({k: tuple(v.shape) for k, v in state.items()}, str(input_path))
    tensors = {k: v.detach().cpu().contiguous().numpy() for k, v in state.items()}

    import safetensors.numpy

    output_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "source": input_path.name, "source_sha256": sha256}
    safetensors.numpy.save_file(tensors, output_path, metadata=metadata)
    return output_path


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")

    def run():
        if not FLAGS.input or not FLAGS.output:
            raise CheckpointError("pass both --input (the .pth) and --output (.safetensors)")
        path = convert(FLAGS.input, FLAGS.output, overwrite=FLAGS.overwrite)
        print(f"wrote {path}")

    cli.run(run)


def define_flags() -> None:
    """The command's flags, defined only when it runs as a program: `convert` is imported by
    tools and tests beside other CLIs (evaluate has its own --overwrite)."""
    flags.DEFINE_string("input", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
    flags.DEFINE_string("output", None, "The safetensors file to write.")
    flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


if __name__ == "__main__":
    define_flags()
    app.run(main)

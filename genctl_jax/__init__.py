"""genctl_jax: train and sample controllable image generators with JAX/Flax on device meshes."""

__version__ = "0.1.0"

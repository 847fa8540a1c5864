"""Meshes, logical-axis sharding and multi-host helpers."""

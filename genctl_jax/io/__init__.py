"""Checkpoints, images and weight import/export."""

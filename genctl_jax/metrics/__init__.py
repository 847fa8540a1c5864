"""Evaluation metrics: sample fidelity on the embedded dataset (FID/KID/IS come later)."""

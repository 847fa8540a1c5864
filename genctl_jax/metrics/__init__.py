"""Evaluation metrics: sample fidelity on the embedded dataset (`fidelity`) and the host-side
math of FID, KID and IS (`distribution`; the Inception feature network comes later)."""

"""Evaluation metrics: sample fidelity on the embedded dataset (`fidelity`), the host-side
math of FID, KID and IS (`distribution`) and CLIP score (`clip_score`)."""

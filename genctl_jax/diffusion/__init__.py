"""Gaussian diffusion maths and samplers.

- `schedules`: noise schedules (`Schedule`, `make_schedule`), the forward process
  `q_sample`, `snr` and the `config.diffusion` block.
- `prediction`: the eps / x0 / v parameterisations, training targets and min-SNR loss weights.
- `samplers`: DDPM and DDIM steps, timestep spacings and `sample`, the whole guided
  denoising loop in one jit; the `config.sampling` block.
"""

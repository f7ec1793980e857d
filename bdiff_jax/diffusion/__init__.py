"""Masked (absorbing-state) diffusion: schedules, corruption, time draws, the ELBO, the
masked-position output head and the ancestral sampler."""

"""diffusers' FlaxDDIMScheduler set up as the reference's DDIM: the oracle of mgjax.method.ddim."""

import logging

from tests.tiny_models import SCHEDULER


def ddim_oracle(num_steps: int):
    """(scheduler, state) with Stable Diffusion's betas, no sample clipping, no "alpha to one",
    timesteps offset by 1: the reference's schedule."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers import FlaxDDIMScheduler

    sched = FlaxDDIMScheduler(**SCHEDULER)
    state = sched.set_timesteps(sched.create_state(), num_steps)
    return sched, state

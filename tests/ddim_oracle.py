"""diffusers' FlaxDDIMScheduler set up as the reference's DDIM: the oracle of mgjax.ddim."""

import logging


def ddim_oracle(num_steps: int):
    """(scheduler, state) with Stable Diffusion's betas, no sample clipping, no "alpha to one",
    timesteps offset by 1: the reference's schedule."""
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers import FlaxDDIMScheduler

    sched = FlaxDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    state = sched.set_timesteps(sched.create_state(), num_steps)
    return sched, state

"""The method's numbers as data: one value per image, read inside the compiled step.

The guided sampler's program depends on shapes and on what its settings *do* (how many steps,
K, the loops, the dtype, the energy's form, whether classifier-free guidance runs at all), never
on the values of its weights: those are `Numeric`, a pytree of f32[B] arrays that travels in
`mgjax.method.inputs.GuidanceInputs` (the idea of optax's `inject_hyperparams`: hyperparameters as
state, not as constants). So one compiled program serves every guidance weight, and a batch may
mix images with different weights; `jax.vmap` and `jax.grad` reach them like any other input.

What stays static, and why (`structure`, and the switches of `mgjax.method.guidance.Guidance`):
  * steps, recursive_steps, raft_iters, raft_gradient, oracle: loop lengths and the energy's
    form;
  * occlusion_masking: `(mgjax.method.inputs).prepare` makes the masks of a whole batch at once;
  * preserve_weight > 0 or not: whether the PreservationEnergy term is computed at all (the
    energy's form); its value is data, and so is preserve_ramp, its growth over the steps;
  * cfg_scale != 1 for some image of the batch: the unconditional UNet half runs (a batch whose
    every scale is 1 skips it, half the UNet's work); a batch mixing 1 and other scales runs
    CFG for all, and an image with scale 1 then gets eps_u + 1 (eps_c - eps_u), equal to eps_c
    up to one rounding of the subtraction;
  * eta > 0 for some image: DDIM's stochastic term is drawn (eta 0 images add 0 x noise);
  * which DDIM steps evaluate the energy (skip_unguided): a step is skipped when lambda_g x
    schedule is 0 for every image; an image with weight 0 in a batch with guided images is
    evaluated (its energy is logged, its guidance term is 0 x the gradient);
  * the cost levers (guide_from, guide_until, guide_every, recursive_phases, recurse_unguided,
    rescale_guidance, reuse_gradient, cfg_gradient; mgjax.method.cost): they decide which
    steps may be guided, how many evaluations a step runs and which networks an evaluation
    differentiates, which the driver reads on the host before it traces, as it reads which
    steps skip_unguided skips. At their defaults none of their code is traced.

paste_source and paste_band are static too: they shape the final decode
(mgjax.method.guidance.final_image), which no sampling step reads.

warp_start is neither: it moves the first latent on the host before the first step
(mgjax.method.start), so methods that differ in it alone share a Sampler.

A value read at run time rounds as the constant it replaces does, but XLA may order the
arithmetic around it differently: on the toy demo one guided evaluation's latent moves by
8e-8 of its norm (below float32's epsilon, 1.2e-7), which 100 guided steps amplify as any
rounding difference (a thread count, a batch size) is amplified.
"""

import dataclasses
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from flax import struct

from mgjax.config import Method

# Method fields that are values, not structure (Numeric's fields, in this order).
FIELDS = (
    "guidance_weight",
    "flow_weight",
    "color_weight",
    "preserve_weight",
    "preserve_ramp",
    "clip",
    "cfg_scale",
    "eta",
)


@struct.dataclass
class Numeric:
    """The method's numbers of B edits, every leaf batch-first (MOTION_GUIDANCE.md's names)."""

    guidance_weight: jnp.ndarray  # f32[B] lambda_g
    flow_weight: jnp.ndarray  # f32[B] lambda_flow
    color_weight: jnp.ndarray  # f32[B] lambda_color
    preserve_weight: jnp.ndarray  # f32[B] weight of PreservationEnergy (0: none)
    preserve_ramp: jnp.ndarray  # f32[B] that weight at the last step over it at the first
    clip: jnp.ndarray  # f32[B] max L2 norm of the guidance term (0: off)
    cfg_scale: jnp.ndarray  # f32[B] classifier-free guidance scale
    eta: jnp.ndarray  # f32[B] DDIM eta


def of(methods: Method | Sequence[Method], batch: int | None = None, dtype=jnp.float32) -> Numeric:
    """The numbers of one method repeated `batch` times, or of one method per image."""
    if isinstance(methods, Method):
        methods = [methods] * (1 if batch is None else batch)
    elif batch is not None and len(methods) != batch:
        raise ValueError(f"{len(methods)} methods for a batch of {batch}")
    columns = {f: np.array([getattr(m, f) for m in methods], np.float64) for f in FIELDS}
    return Numeric(**{f: jnp.asarray(v, dtype) for f, v in columns.items()})


def replace(numeric: Numeric, **values) -> Numeric:
    """`numeric` with fields set to a value (broadcast over the batch) or to one per image."""
    batch = numeric.guidance_weight.shape
    dtype = numeric.guidance_weight.dtype
    return numeric.replace(
        **{k: jnp.broadcast_to(jnp.asarray(v, dtype), batch) for k, v in values.items()}
    )


def structure(method: Method) -> Method:
    """What of `method` decides the compiled program's structure: the method with its numbers
    set to the defaults, except preserve_weight, which keeps whether it is positive (the energy's
    form), and warp_start off (the first latent is the driver's). Equal structures share a
    Sampler and its compiled programs (batches, the editor)."""
    defaults = {f: getattr(Method(), f) for f in FIELDS}
    defaults["warp_start"] = False  # the first latent, made on the host (mgjax.method.start)
    defaults["preserve_weight"] = 1.0 if method.preserve_weight > 0 else 0.0
    return dataclasses.replace(method, **defaults)


@dataclasses.dataclass(frozen=True)
class Switches:
    """What a batch's values switch on in the program (static: each combination compiles once)."""

    cfg: bool = True  # some image's cfg_scale is not 1: the unconditional half runs for all
    stochastic: bool = False  # some image's eta is positive: DDIM's noise term is drawn

    @classmethod
    def of(cls, numeric: Numeric) -> "Switches":
        """The switches a batch's numbers need (reads them on the host)."""
        cfg, eta = np.asarray(numeric.cfg_scale), np.asarray(numeric.eta)
        return cls(cfg=bool((cfg != 1.0).any()), stochastic=bool((eta > 0).any()))

    @classmethod
    def of_method(cls, method: Method) -> "Switches":
        return cls(cfg=method.cfg_scale != 1.0, stochastic=method.eta > 0)


def per_image(x: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """A f32[B] value shaped to broadcast against a batch-first array of `ndim` dimensions."""
    return jnp.reshape(x, (-1,) + (1,) * (ndim - 1))

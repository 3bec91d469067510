"""Rematerialization inside the diffusers Flax models, one block at a time (remat "blocks").

`jax.checkpoint` around a whole model keeps only the model's inputs, but its backward pass
recomputes the whole forward pass and holds all of its activations at once, so the peak does not
fall (BENCHMARKS.md, memory per lever). Checkpointing each
block on its own keeps only the block boundaries, and the backward pass of one block holds that
block's activations alone.

The diffusers classes are not ours to change, so the blocks are wrapped from outside: a Flax
method interceptor (`nn.intercept_methods`) catches each call of a listed block class and runs
it under Flax's lifted `nn.checkpoint`, which handles the module's parameters as a lifted
transform must. The numbers are the same up to rounding (tests/test_levers.py).
"""

import threading

import flax.linen as nn
import jax
import numpy as np

# Class names (diffusers 0.39 Flax) of the blocks checkpointed one at a time: the UNet's down,
# mid and up blocks, and the VAE decoder's mid and up blocks (its encoder's, when encoding).
BLOCKS = frozenset(
    {
        "FlaxCrossAttnDownBlock2D",
        "FlaxDownBlock2D",
        "FlaxUNetMidBlock2DCrossAttn",
        "FlaxCrossAttnUpBlock2D",
        "FlaxUpBlock2D",
        "FlaxUNetMidBlock2D",
        "FlaxUpDecoderBlock2D",
        "FlaxDownEncoderBlock2D",
    }
)

_state = threading.local()  # .inside: a checkpointed block is being traced (no nesting)


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        context.method_name != "__call__"
        or type(module).__name__ not in BLOCKS
        or getattr(_state, "inside", False)
    ):
        return next_fun(*args, **kwargs)
    # Array leaves (tensors, tuples of skip connections) become the checkpoint's inputs; the
    # rest (deterministic=True, None) stays static in the closure.
    leaves, tree = jax.tree_util.tree_flatten((args, kwargs))
    where = [n for n, leaf in enumerate(leaves) if _is_array(leaf)]

    def block(mdl, arrays):
        full = list(leaves)
        for n, a in zip(where, arrays, strict=True):
            full[n] = a
        a, kw = jax.tree_util.tree_unflatten(tree, full)
        _state.inside = True  # the call below meets this interceptor again
        try:
            return mdl(*a, **kw)
        finally:
            _state.inside = False

    return nn.checkpoint(block)(module, [leaves[n] for n in where])


def per_block(fn):
    """`fn` (which applies diffusers Flax models) with each BLOCKS call checkpointed."""

    def wrapped(*args, **kwargs):
        with nn.intercept_methods(_interceptor):
            return fn(*args, **kwargs)

    return wrapped

"""A UNet grown without changing what it computes: more layers per block (`deeper_unet`), or
attention that reads the prompt at the latent's own size (`with_top_attention`); each new layer
starts as the identity, so that training continues from the smaller UNet's function.

diffusers' UNet2DConditionModel keeps every down layer's output as a skip connection and gives
each up block one layer more than its down block, each consuming one skip. With `n` layers per
block instead of `l`, the down block's new layers come after its old ones; a new ResNet whose
last convolution is zero returns its input, so each new skip equals the last old layer's output.
The up block pops its skips in reverse: its first layer meets the last new skip (the same value
the old first layer met), the next `n - l` layers are new, and the old remaining layers follow
and meet the old skips in the old order. A new up ResNet's 1x1 shortcut passes the hidden
channels through and drops the concatenated skip; a new attention block's zero output
projection makes it return its input (both are residual).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from mgjax.model.libraries import FlaxUNet2DConditionModel, quiet
from mgjax.model.random_init import random_params
from mgjax.model.weights import param_shapes


def _identity_layer(tree: dict, shortcut: bool) -> dict:
    """A new ResNet (or attention) layer's parameters set so that it returns its input."""
    flat = dict(flatten_dict(tree))
    for path, value in flat.items():
        if path[0] in ("conv2", "proj_out"):
            flat[path] = np.zeros_like(value)
        elif path[0] == "conv_shortcut" and shortcut:
            if path[-1] == "kernel":  # (1, 1, hidden + skip, out): the hidden channels pass
                kernel = np.zeros_like(value)
                kernel[0, 0, : value.shape[-1], :] = np.eye(value.shape[-1], dtype=value.dtype)
                flat[path] = kernel
            else:
                flat[path] = np.zeros_like(value)
    return unflatten_dict(flat)


def _fresh_params(config: Mapping[str, Any], seed: int) -> dict:
    """Random parameters of the UNet `config` describes (the new layers' non-zero weights)."""
    with quiet():
        model = FlaxUNet2DConditionModel.from_config(config)
    return random_params(param_shapes(model), seed)


def _checked(grown: dict, fresh: dict, what: str) -> dict:
    """`grown`, once its parameter tree matches the grown UNet's (`fresh`) path for path and
    shape: a block type the growth does not describe would leave it otherwise."""
    shapes = {k: np.shape(v) for k, v in flatten_dict(grown).items()}
    expected = {k: tuple(v.shape) for k, v in flatten_dict(fresh).items()}
    if shapes != expected:
        raise ValueError(f"{what}: the grown parameters do not match the grown UNet's")
    return grown


def deeper_unet(
    config: Mapping[str, Any], params: Mapping[str, Any], layers: int, seed: int = 0
) -> tuple[dict, dict]:
    """(config, params) of the UNet with `layers` layers per block that computes what the UNet
    (`config`, `params`) computes; the new layers' other weights are random (`seed`), so that
    training moves them once their zero weights move. `layers` at least the current number."""
    old = int(config["layers_per_block"])
    if not isinstance(layers, int) or layers < old:
        raise ValueError(f"layers {layers!r}: give a whole number of at least {old} per block")
    new_config = dict(config, layers_per_block=layers)
    fresh = _fresh_params(new_config, seed)
    grown = {k: v for k, v in fresh.items() if not k.startswith(("down_blocks_", "up_blocks_"))}
    grown.update({k: params[k] for k in grown})  # conv_in, time embedding, mid block, conv_out
    for name in (k for k in fresh if k.startswith("down_blocks_")):
        block = dict(params[name])  # old layers and downsampler keep their names
        for i in range(old, layers):
            block[f"resnets_{i}"] = _identity_layer(fresh[name][f"resnets_{i}"], shortcut=False)
            if f"attentions_{i}" in fresh[name]:
                block[f"attentions_{i}"] = _identity_layer(fresh[name][f"attentions_{i}"], False)
        grown[name] = block
    for name in (k for k in fresh if k.startswith("up_blocks_")):
        block = {k: v for k, v in params[name].items() if k.startswith("upsamplers_")}
        # new position 0 <- old 0; 1 .. layers-old new; layers-old+j <- old j (j >= 1)
        source = [0] + [None] * (layers - old) + list(range(1, old + 1))
        for i, j in enumerate(source):
            for kind, shortcut in (("resnets", True), ("attentions", False)):
                key = f"{kind}_{i}"
                if key not in fresh[name]:
                    continue
                if j is None:
                    block[key] = _identity_layer(fresh[name][key], shortcut)
                else:
                    block[key] = params[name][f"{kind}_{j}"]
        grown[name] = block
    return new_config, _checked(grown, fresh, "deeper_unet")


def top_attention_config(config: Mapping[str, Any]) -> dict:
    """The UNet config with cross-attention layers in its first down and last up block (see
    `with_top_attention`); those blocks must have none."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    if (down[0], up[-1]) != ("DownBlock2D", "UpBlock2D"):
        raise ValueError(
            f"the UNet's top blocks are {down[0]} / {up[-1]}, not DownBlock2D / UpBlock2D "
            "without attention"
        )
    only = config.get("only_cross_attention", False)
    only = list(only) if isinstance(only, list | tuple) else [bool(only)] * len(down)
    return dict(
        config,
        down_block_types=("CrossAttnDownBlock2D", *down[1:]),
        up_block_types=(*up[:-1], "CrossAttnUpBlock2D"),
        only_cross_attention=(True, *only[1:]),
    )


def with_top_attention(
    config: Mapping[str, Any], params: Mapping[str, Any], seed: int = 0
) -> tuple[dict, dict]:
    """(config, params) of the UNet whose first down block and last up block (the latent's own
    size) gain an attention layer after each ResNet, reading the prompt (`only_cross_attention`
    there: queries from the image, keys and values from the text in both of its attention
    layers, so no attention over every latent pixel pair), and that computes what the UNet
    (`config`, `params`) computes: each new layer's output projection is zero."""
    new_config = top_attention_config(config)
    fresh = _fresh_params(new_config, seed)
    grown = dict(params)
    for name in ("down_blocks_0", f"up_blocks_{len(config['up_block_types']) - 1}"):
        block = dict(params[name])
        for key, value in fresh[name].items():
            if key.startswith("attentions_"):
                block[key] = _identity_layer(value, shortcut=False)
        grown[name] = block
    return new_config, _checked(grown, fresh, "with_top_attention")

"""Models of the real classes with random parameters, built from configs alone (the tests' tiny
models, the toy pack's starting point), and the byte symbols a CLIP vocabulary starts with."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mgjax.model.libraries import (
    CLIPTextConfig,
    CLIPTokenizer,
    FlaxAutoencoderKL,
    FlaxCLIPTextModel,
    FlaxUNet2DConditionModel,
    bytes_to_unicode,
    quiet,
)
from mgjax.model.stable_diffusion import StableDiffusion, build
from mgjax.model.weights import param_shapes


def byte_symbols() -> list[str]:
    """The 256 characters CLIP's byte-level BPE spells bytes with, in the order CLIP's vocab.json
    gives them ids 0-255 (printable bytes first).

    A CLIP vocabulary holds each of them, then each again with the word-end mark `</w>`, then
    the tokens its merges make and `<|startoftext|>` / `<|endoftext|>`.
    """
    return list(bytes_to_unicode().values())


def random_params(shapes, seed: int):
    """Random parameters for a shape pytree, without tracing the model (Flax's init compiles the
    whole forward pass: 20 s for the tiny UNet). Kernels ~ N(0, 1/fan_in), norm scales ~ 1,
    biases and embeddings small."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        shape = x.shape
        if name == "kernel":
            v = rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "scale":
            v = 1.0 + 0.02 * rng.standard_normal(shape)
        else:  # bias, embedding
            v = 0.02 * rng.standard_normal(shape)
        return jnp.asarray(v, x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


def random_init(
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_config: Mapping[str, Any],
    tokenizer_folder: str | Path,
    seed: int = 0,
    dtype: str = "float32",
    attention: str = "plain",
) -> StableDiffusion:
    """SD-class models from configs with random parameters (`random_params`), no weights read.

    Args:
        unet_config, vae_config: FlaxUNet2DConditionModel / FlaxAutoencoderKL constructor
            arguments (a diffusers config.json's content; unset fields take their defaults).
        text_config: CLIPTextConfig arguments.
        tokenizer_folder: a CLIPTokenizer folder (vocab.json, merges.txt, and optionally
            tokenizer_config.json with e.g. model_max_length).
        seed: the UNet, VAE and text encoder draw from seeds 3*seed, 3*seed+1, 3*seed+2.
        dtype, attention: as in `build`.
    """
    with quiet():
        unet = FlaxUNet2DConditionModel.from_config(dict(unet_config))
        vae = FlaxAutoencoderKL.from_config(dict(vae_config))
        text = FlaxCLIPTextModel(CLIPTextConfig(**text_config), _do_init=False)
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
        models = (("unet", unet), ("vae", vae), ("text", text))
        params = {
            name: random_params(param_shapes(m), seed * 3 + i) for i, (name, m) in enumerate(models)
        }
    return build(unet.config, vae.config, text.config, tokenizer, params, dtype, attention)

"""PyTorch weights of a diffusers folder, read without torch and renamed to Flax parameters.

`.safetensors` files go through safetensors' numpy reader and `.bin` files through `flow.pth`'s
restricted unpickler; diffusers' and transformers' own converters then rename the tensors.
"""

from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import load_file

from flow.errors import InputError
from flow.pth import read_state_dict
from mgjax.model.libraries import (
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
    diffusers_from_pt,
    transformers_from_pt,
)


class Shapes:
    """Stands in for a model in diffusers'/transformers' converters, which read only parameter
    shapes: it answers them from `jax.eval_shape` instead of a slow eager random init."""

    def __init__(self, model, shapes):
        self.base_model_prefix = getattr(model, "base_model_prefix", "")
        self.params = shapes

    def init_weights(self, key):
        return self.params


def param_shapes(model):
    key = jax.random.PRNGKey(0)
    if isinstance(model, FlaxCLIPTextModel | FlaxCLIPTextModelWithProjection):
        return jax.eval_shape(lambda k: model.init_weights(k, model.input_shape), key)
    return jax.eval_shape(model.init_weights, key)


class Tensor:
    """What diffusers' converter expects of a torch tensor: `.numpy()`."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


def read_torch_weights(folder: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict from a diffusers/transformers subfolder, read without torch."""
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return dict(load_file(str(folder / name)))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise InputError(
        f"{folder}: no PyTorch weights (diffusion_pytorch_model.safetensors/.bin or "
        "model.safetensors/pytorch_model.bin); pass a diffusers folder or drop from_pt"
    )


def float32(sd: dict) -> dict:
    return {
        k: (v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v)
        for k, v in sd.items()
    }


def unet_or_vae_from_pt(module, folder: Path):
    """Flax parameters of a diffusers UNet or VAE `module` from the PyTorch weights in `folder`."""
    state = {k: Tensor(v) for k, v in float32(read_torch_weights(folder)).items()}
    return diffusers_from_pt(state, Shapes(module, param_shapes(module)))


def text_encoder_from_pt(module, folder: Path):
    """Flax parameters of a transformers CLIP text encoder `module` from the PyTorch weights in
    `folder`."""
    return transformers_from_pt(
        float32(read_torch_weights(folder)), Shapes(module, param_shapes(module))
    )

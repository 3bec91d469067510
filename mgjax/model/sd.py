"""The Stable Diffusion seam: the model as the rest of mgjax sees it.

Under mgjax/model/ only, diffusers and transformers are imported (mgjax.model.libraries); this
module gathers what the layers above use:

* `StableDiffusion` (mgjax.model.stable_diffusion): one model's networks and parameters, with
  `eps`, `decode`, `encode`, `posterior`, `embed`, `token_ids` and `text_states`; `build` makes
  one from configs, `cast` and `DTYPES` set its precision;
* `load`, `save`, `load_autoencoder` (mgjax.model.loading): diffusers folders and hub ids, Flax
  or PyTorch weights (mgjax.model.weights), SD 1.x, v-prediction and SDXL;
* `random_init`, `random_params`, `byte_symbols` (mgjax.model.random_init): models of the real
  classes with random weights, and the start of a CLIP vocabulary;
* `deeper_unet`, `with_top_attention` (mgjax.model.grow): a UNet made deeper, or given text
  attention at the latent's size, without changing what it computes.
"""

from mgjax.model.grow import deeper_unet, top_attention_config, with_top_attention
from mgjax.model.loading import load, load_autoencoder, save
from mgjax.model.random_init import byte_symbols, random_init, random_params
from mgjax.model.stable_diffusion import DTYPES, StableDiffusion, build, cast

__all__ = [
    "DTYPES",
    "StableDiffusion",
    "build",
    "byte_symbols",
    "cast",
    "deeper_unet",
    "load",
    "load_autoencoder",
    "random_init",
    "random_params",
    "save",
    "top_attention_config",
    "with_top_attention",
]

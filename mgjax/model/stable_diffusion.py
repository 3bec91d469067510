"""The seam object: `StableDiffusion`, the UNet, VAE and CLIP text encoder(s) of one model with
their parameters, and `build`, which instantiates the Flax modules from configs.

The sampler sees one interface whatever the kind: `embed` returns an opaque conditioning pytree
(mgjax.model.conditioning), `eps` a noise estimate (a v-prediction model's output converted),
`decode`/`encode` apply the model's own scaling factor. Every method that runs a network takes
the parameter pytree as an explicit argument, so the sampler can pass the weights as jit
arguments. Latents are NCHW (the diffusers layout, and the reference's file layout); images are
NHWC.
"""

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flow.errors import InputError
from mgjax.model import conditioning
from mgjax.model.levers import ATTENTION
from mgjax.model.libraries import (
    FlaxAutoencoderKL,
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
    FlaxUNet2DConditionModel,
    quiet,
)
from mgjax.model.schedule import alphas_cumprod

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def cast(tree, dtype):
    """Floating leaves of a pytree to `dtype` (diffusers' to_bf16 family breaks on current JAX)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


@dataclass(eq=False)
class StableDiffusion:
    """UNet + VAE + CLIP text encoder(s) + tokenizer(s); the parameters live in `params`.

    `params` = {"unet", "vae", "text"} (SDXL: and "text_2") is a pytree; every method that runs
    a network takes it explicitly, so jitted callers pass the weights as arguments instead of
    baking constants.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    params: dict
    dtype: Any = jnp.float32
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection (hidden states + pooled)
    tokenizer_2: Any = None
    prediction_type: str = "epsilon"  # the scheduler's: epsilon or v_prediction
    # SDXL's force_zeros_for_empty_prompt: the prompt "" conditions with zeros, the
    # unconditional input SDXL was trained with
    zero_uncond: bool = False

    def __post_init__(self):
        self._embeddings: dict[str, tuple] = {}
        if self.prediction_type not in conditioning.PREDICTION_TYPES:
            raise InputError(
                f"prediction_type {self.prediction_type!r} is not supported; one of "
                f"{conditioning.PREDICTION_TYPES}"
            )

    @property
    def text_time(self) -> bool:
        """Whether the UNet takes SDXL's added conditions (pooled embedding and time ids)."""
        return self.unet.config.get("addition_embed_type") == "text_time"

    @property
    def default_size(self) -> int:
        """The image side the model was trained at (512 for SD v1.x, 1024 for SDXL)."""
        return self.unet.config.sample_size * self.vae_factor

    @property
    def out_dtype(self):
        """dtype of latents and images handed out: float32, or float64 for exactness tests."""
        return jnp.float64 if jnp.dtype(self.dtype) == jnp.float64 else jnp.float32

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel (8 for SD v1.x)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def eps(self, params, z, t, cond):
        """Noise estimate: z f32[N,C,h,w], t i32[N], cond the conditioning pytree of `embed`
        (batch N) -> f32[N,C,h,w]. A v-prediction model's output is converted
        (conditioning.eps_from_v: eps = sqrt(abar) v + sqrt(1 - abar) z)."""
        t = jnp.asarray(t, jnp.int32)
        added = None
        if self.text_time:  # SDXL: the pooled embedding and the time ids as added conditions
            added = {"text_embeds": cond["pooled"].astype(self.dtype), "time_ids": cond["time_ids"]}
            cond = cond["text"]
        with quiet():
            out = self.unet.apply(
                {"params": params["unet"]},
                jnp.asarray(z).astype(self.dtype),
                t,
                jnp.asarray(cond).astype(self.dtype),
                added_cond_kwargs=added,
            ).sample
        out = out.astype(self.out_dtype)
        if self.prediction_type == "v_prediction":
            abar = jnp.asarray(alphas_cumprod(), self.out_dtype)[t]
            out = conditioning.eps_from_v(out, jnp.asarray(z, self.out_dtype), abar)
        return out

    def decode(self, params, latents):
        """Latents f32[N,C,h,w] (scaled) -> images f32[N,H,W,3], about [-1, 1], not clamped."""
        with quiet():
            x = self.vae.apply(
                {"params": params["vae"]},
                (latents / self.scaling_factor).astype(self.dtype),
                method=self.vae.decode,
            ).sample
        return jnp.transpose(x.astype(self.out_dtype), (0, 2, 3, 1))

    def encode(self, params, images):
        """Images f32[N,H,W,3] in [-1, 1] -> posterior mean * scaling factor, f32[N,C,h,w]."""
        x = jnp.transpose(images, (0, 3, 1, 2)).astype(self.dtype)
        with quiet():
            dist = self.vae.apply({"params": params["vae"]}, x, method=self.vae.encode).latent_dist
        mean = jnp.transpose(dist.mean, (0, 3, 1, 2))  # Flax's encoder answers in NHWC
        return mean.astype(self.out_dtype) * self.scaling_factor

    def posterior(self, params, images):
        """Images f32[N,H,W,3] in [-1, 1] -> the VAE posterior's (mean, std), each f32[N,C,h,w]
        and unscaled (the autoencoder's own latent space, for training it)."""
        x = jnp.transpose(images, (0, 3, 1, 2)).astype(self.dtype)
        with quiet():
            dist = self.vae.apply({"params": params["vae"]}, x, method=self.vae.encode).latent_dist
        return tuple(
            jnp.transpose(a, (0, 3, 1, 2)).astype(self.out_dtype) for a in (dist.mean, dist.std)
        )

    def token_ids(self, prompts) -> np.ndarray:
        """Prompts -> token ids i32[N,L], padded to the tokenizer's model_max_length."""
        ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="np",
        ).input_ids  # fmt: skip
        return np.asarray(ids, np.int32)

    def text_states(self, params, ids):
        """Token ids i32[N,L] -> the text encoder's last hidden states f32[N,L,D], traceable
        (the conditioning of an SD v1-style model, for training it with the UNet)."""
        with quiet():
            return self.text_encoder(ids, params=params["text"])[0]

    def embed(self, prompts, size: tuple[int, int] | None = None):
        """The conditioning of a list of prompts, each encoded once: CLIP's last hidden states
        f32[N,L,D]; for SDXL {"text": both encoders' penultimate hidden states concatenated
        f32[N,L,D1+D2], "pooled": the second encoder's projection f32[N,P], "time_ids":
        f32[N,6] for an uncropped image of `size` (H, W) pixels, default the model's native}."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = sorted({p for p in prompts if p not in self._embeddings})
        if missing and self.text_encoder is None:
            raise ValueError(
                "this model was loaded without its text encoder (text_encoder=False): pass "
                "prompt embeddings directly, or load it with the text encoder"
            )
        if missing:
            with quiet():
                encoded = conditioning.encode_prompts(self, missing)
            for i, p in enumerate(missing):
                self._embeddings[p] = tuple(e[i] for e in encoded)
        text = np.stack([self._embeddings[p][0] for p in prompts])
        if not self.text_time:
            return jnp.asarray(text)
        h, w = size or (self.default_size,) * 2
        return {
            "text": jnp.asarray(text),
            "pooled": jnp.asarray(np.stack([self._embeddings[p][1] for p in prompts])),
            "time_ids": jnp.asarray(conditioning.time_ids(h, w, len(prompts))),
        }

    @property
    def attention(self) -> str:
        return ATTENTION[int(bool(self.unet.use_memory_efficient_attention))]

    def astype(self, dtype: str) -> "StableDiffusion":
        """The same models with parameters and computation in `dtype` (float32 or bfloat16;
        float64 under jax_enable_x64, for exactness tests)."""
        return self.configure(dtype=dtype)

    def configure(self, dtype: str | None = None, attention: str | None = None):
        """The same weights with another computation dtype and/or UNet attention (ATTENTION)."""
        return build(
            self.unet.config,
            self.vae.config,
            None if self.text_encoder is None else self.text_encoder.config,
            self.tokenizer,
            self.params,
            dtype or jnp.dtype(self.dtype).name,
            attention or self.attention,
            text_2=None
            if self.text_encoder_2 is None
            else (self.text_encoder_2.config, self.tokenizer_2),
            prediction_type=self.prediction_type,
            zero_uncond=self.zero_uncond,
        )


def check_dtype(name: str):
    if name not in ("float32", "bfloat16") and not (
        name == "float64" and jax.config.jax_enable_x64
    ):
        raise InputError(f"dtype must be float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def check_attention(name: str) -> bool:
    if name not in ATTENTION:
        raise InputError(f"attention must be one of {ATTENTION}, got {name!r}")
    return name == "memory_efficient"


def given(config) -> dict:
    """A module's config as a dict whose every value from_config takes as given: diffusers
    lists the keys an in-memory module left at their defaults under `_use_default_values`, and
    from_config would put those defaults back over any value set since (a measured latent
    scaling factor, say). A saved config.json holds no such list."""
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


def build(
    unet_config,
    vae_config,
    text_config,
    tokenizer,
    params,
    dtype="float32",
    attention="plain",
    text_2=None,
    prediction_type: str = "epsilon",
    zero_uncond: bool = False,
):
    """Instantiate the Flax modules from configs with computation dtype `dtype` and the UNet
    attention implementation `attention` (ATTENTION); text_config None: no text encoder.
    text_2: SDXL's second encoder, (CLIPTextConfig, tokenizer), or None. The VAE computes in
    `dtype` too, float32 or bfloat16: there is no float16 path (SDXL's VAE overflows in it)."""
    jdt = check_dtype(dtype)
    with quiet():
        unet = FlaxUNet2DConditionModel.from_config(
            given(unet_config), dtype=jdt, use_memory_efficient_attention=check_attention(attention)
        )
        vae = FlaxAutoencoderKL.from_config(given(vae_config), dtype=jdt)
        text = text2 = tokenizer_2 = None
        if text_config is not None:
            text = FlaxCLIPTextModel(text_config, dtype=jdt, _do_init=False)
            if text_2 is not None:
                text2 = FlaxCLIPTextModelWithProjection(text_2[0], dtype=jdt, _do_init=False)
                tokenizer_2 = text_2[1]
    texts = {"text", "text_2"}
    params = {k: cast(v, jdt) for k, v in params.items() if k not in texts or text is not None}
    return StableDiffusion(
        unet, vae, text, tokenizer, params, jdt, text2, tokenizer_2, prediction_type, zero_uncond
    )

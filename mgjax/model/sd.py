"""The Stable Diffusion seam: the one module that imports diffusers and transformers.

It loads SD 1.x, SD 2.x-style v-prediction models and SDXL (the UNet, the VAE, the CLIP text
encoder(s) and tokenizer(s)) from

* a hub id and revision (`CompVis/stable-diffusion-v1-4`, revision `flax` or `bf16`),
* a local diffusers-format folder holding Flax weights (offline), or
* a local (or hub) diffusers-format folder holding PyTorch weights (`from_pt=True`). These are
  read without torch: `.safetensors` through safetensors' numpy reader and `.bin` through
  `flow.pth`'s restricted unpickler, then renamed by diffusers' / transformers' converters.

and it builds random-init models of the same classes from configs (`random_init`; the tests
use tiny ones). The kind is read from the model's configs: the UNet's `addition_embed_type`
"text_time" means SDXL's conditioning (two text encoders, pooled embedding, size time ids), the
scheduler's `prediction_type` "v_prediction" a model whose output `eps` converts to a noise
estimate. The sampler sees one interface whatever the kind: `embed` returns an opaque
conditioning pytree (mgjax.model.conditioning), `eps` a noise estimate, `decode`/`encode` apply the
model's own scaling factor. Everything the sampler needs is a method here, taking the parameter
pytree as an explicit argument, so the sampler can pass the weights as jit arguments. Latents
are NCHW (the diffusers layout, and the reference's file layout); images are NHWC.

diffusers 0.39 and transformers 4.x log a deprecation notice from every Flax class they define
and every Flax module's `setup()`; the calls into them made here run under `_quiet()`, which
silences those notices for the duration of the call and changes nothing else.
"""

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import transformers

from flow.errors import InputError
from mgjax.method import ddim
from mgjax.model import conditioning
from mgjax.model.levers import ATTENTION
from mgjax.model.modelinfo import hub_reachable, offline_error

# The libraries' root loggers; getting them sets their levels from DIFFUSERS_VERBOSITY and
# TRANSFORMERS_VERBOSITY (default: warning), which _quiet() restores after each call.
_LOGGERS = (
    diffusers.utils.logging.get_logger("diffusers"),
    transformers.utils.logging.get_logger("transformers"),
)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Runs the body with diffusers' and transformers' deprecation notices silenced: their
    loggers at ERROR and their warnings filtered, both restored on exit."""
    levels = [logger.level for logger in _LOGGERS]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
        warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
        for logger in _LOGGERS:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(_LOGGERS, levels, strict=True):
                logger.setLevel(level)


with _quiet():  # the Flax classes log their deprecation notice as they are defined
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxDDIMScheduler,
        FlaxDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )
    from diffusers.models.modeling_flax_pytorch_utils import (
        convert_pytorch_state_dict_to_flax as _diffusers_from_pt,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTokenizer,
        FlaxCLIPTextModel,
        FlaxCLIPTextModelWithProjection,
    )
    from transformers.modeling_flax_pytorch_utils import (
        convert_pytorch_state_dict_to_flax as _transformers_from_pt,
    )
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_REVISION = "flax"
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
        with _quiet():
            out = self.unet.apply(
                {"params": params["unet"]},
                jnp.asarray(z).astype(self.dtype),
                t,
                jnp.asarray(cond).astype(self.dtype),
                added_cond_kwargs=added,
            ).sample
        out = out.astype(self.out_dtype)
        if self.prediction_type == "v_prediction":
            abar = jnp.asarray(ddim.alphas_cumprod(), self.out_dtype)[t]
            out = conditioning.eps_from_v(out, jnp.asarray(z, self.out_dtype), abar)
        return out

    def decode(self, params, latents):
        """Latents f32[N,C,h,w] (scaled) -> images f32[N,H,W,3], about [-1, 1], not clamped."""
        with _quiet():
            x = self.vae.apply(
                {"params": params["vae"]},
                (latents / self.scaling_factor).astype(self.dtype),
                method=self.vae.decode,
            ).sample
        return jnp.transpose(x.astype(self.out_dtype), (0, 2, 3, 1))

    def encode(self, params, images):
        """Images f32[N,H,W,3] in [-1, 1] -> posterior mean * scaling factor, f32[N,C,h,w]."""
        x = jnp.transpose(images, (0, 3, 1, 2)).astype(self.dtype)
        with _quiet():
            dist = self.vae.apply({"params": params["vae"]}, x, method=self.vae.encode).latent_dist
        mean = jnp.transpose(dist.mean, (0, 3, 1, 2))  # Flax's encoder answers in NHWC
        return mean.astype(self.out_dtype) * self.scaling_factor

    def posterior(self, params, images):
        """Images f32[N,H,W,3] in [-1, 1] -> the VAE posterior's (mean, std), each f32[N,C,h,w]
        and unscaled (the autoencoder's own latent space, for training it)."""
        x = jnp.transpose(images, (0, 3, 1, 2)).astype(self.dtype)
        with _quiet():
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
        with _quiet():
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
            with _quiet():
                encoded = self._encode(missing)
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

    def _encode(self, prompts: list[str]) -> tuple[np.ndarray, ...]:
        """(hidden states f32[N,L,D],) or, for SDXL, (hidden states, pooled f32[N,P])."""

        def ids(tokenizer):
            return tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="np",
            ).input_ids

        if not self.text_time:
            out = self.text_encoder(ids(self.tokenizer), params=self.params["text"])[0]
            return (np.asarray(out, np.float32),)
        # SDXL (diffusers' SDXL pipelines): each encoder's penultimate hidden states, then the
        # second encoder's pooled projection
        one = self.text_encoder(
            ids(self.tokenizer), params=self.params["text"], output_hidden_states=True
        )
        two = self.text_encoder_2(
            ids(self.tokenizer_2), params=self.params["text_2"], output_hidden_states=True
        )
        text = np.concatenate(
            [np.asarray(one.hidden_states[-2]), np.asarray(two.hidden_states[-2])], axis=-1
        ).astype(np.float32)
        pooled = np.array(two.text_embeds, np.float32)
        if self.zero_uncond:
            empty = np.asarray([p == "" for p in prompts])
            text[empty], pooled[empty] = 0.0, 0.0
        return text, pooled

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


def _dtype(name: str):
    if name not in ("float32", "bfloat16") and not (
        name == "float64" and jax.config.jax_enable_x64
    ):
        raise InputError(f"dtype must be float32 or bfloat16, got {name!r}")
    return DTYPES[name]


def _attention(name: str) -> bool:
    if name not in ATTENTION:
        raise InputError(f"attention must be one of {ATTENTION}, got {name!r}")
    return name == "memory_efficient"


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
    jdt = _dtype(dtype)
    with _quiet():
        unet = FlaxUNet2DConditionModel.from_config(
            dict(unet_config), dtype=jdt, use_memory_efficient_attention=_attention(attention)
        )
        vae = FlaxAutoencoderKL.from_config(dict(vae_config), dtype=jdt)
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


# ----------------------------------------------------------------------------- random init


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
    with _quiet():
        unet = FlaxUNet2DConditionModel.from_config(dict(unet_config))
        vae = FlaxAutoencoderKL.from_config(dict(vae_config))
        text = FlaxCLIPTextModel(CLIPTextConfig(**text_config), _do_init=False)
        tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_folder))
        models = (("unet", unet), ("vae", vae), ("text", text))
        params = {
            name: random_params(_param_shapes(m), seed * 3 + i)
            for i, (name, m) in enumerate(models)
        }
    return build(unet.config, vae.config, text.config, tokenizer, params, dtype, attention)


def save(sd: StableDiffusion, folder) -> None:
    """Write a diffusers-format folder with Flax weights (loadable by `load` offline)."""
    folder = Path(folder)
    with _quiet():
        sd.unet.save_pretrained(folder / "unet", params=sd.params["unet"])
        sd.vae.save_pretrained(folder / "vae", params=sd.params["vae"])
        sd.text_encoder.save_pretrained(folder / "text_encoder", params=sd.params["text"])
        sd.tokenizer.save_pretrained(folder / "tokenizer")
        if sd.text_encoder_2 is not None:
            sd.text_encoder_2.save_pretrained(folder / "text_encoder_2", params=sd.params["text_2"])
            sd.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        FlaxDDIMScheduler(  # SD's schedule, as the sampler's DDIM module computes it
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type=sd.prediction_type,
        ).save_pretrained(folder / "scheduler")
    index = {"_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": "0.39.0"}
    if sd.text_time:
        index = dict(index, _class_name="FlaxStableDiffusionXLPipeline")
        index["force_zeros_for_empty_prompt"] = sd.zero_uncond
    (folder / "model_index.json").write_text(json.dumps(index))


# ----------------------------------------------------------------------------- loading


class _Shapes:
    """Stands in for a model in diffusers'/transformers' converters, which read only parameter
    shapes: it answers them from `jax.eval_shape` instead of a slow eager random init."""

    def __init__(self, model, shapes):
        self.base_model_prefix = getattr(model, "base_model_prefix", "")
        self.params = shapes

    def init_weights(self, key):
        return self.params


def _param_shapes(model):
    key = jax.random.PRNGKey(0)
    if isinstance(model, FlaxCLIPTextModel | FlaxCLIPTextModelWithProjection):
        return jax.eval_shape(lambda k: model.init_weights(k, model.input_shape), key)
    return jax.eval_shape(model.init_weights, key)


class _Tensor:
    """What diffusers' converter expects of a torch tensor: `.numpy()`."""

    def __init__(self, array):
        self.array = array

    def numpy(self):
        return self.array


def read_torch_weights(folder: Path) -> dict[str, np.ndarray]:
    """A PyTorch state dict from a diffusers/transformers subfolder, read without torch."""
    from flow.pth import read_state_dict

    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            from safetensors.numpy import load_file

            return dict(load_file(str(folder / name)))
    for name in ("diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (folder / name).is_file():
            return read_state_dict(folder / name)
    raise InputError(
        f"{folder}: no PyTorch weights (diffusion_pytorch_model.safetensors/.bin or "
        "model.safetensors/pytorch_model.bin); pass a diffusers folder or drop from_pt"
    )


def _float32(sd: dict) -> dict:
    return {
        k: (v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v)
        for k, v in sd.items()
    }


# the subfolders read: SD's four, SDXL's second encoder and tokenizer, the scheduler's config
_PARTS = (
    "unet",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "scheduler",
)


def _resolve(
    model: str, revision: str | None, from_pt: bool, text_encoder: bool = True
) -> tuple[str, bool]:
    """(path or hub id, is_local). A hub id for PyTorch weights is fetched to the HF cache."""
    if os.path.isdir(model):
        if not (Path(model) / "unet").is_dir():
            raise InputError(f"{model}: not a diffusers-format folder (no unet/ subfolder)")
        parts = ("vae", "text_encoder", "tokenizer") if text_encoder else ("vae",)
        for part in parts:
            if not (Path(model) / part).is_dir():
                raise InputError(
                    f"{model}: no {part}/ subfolder; a diffusers folder holds unet/, vae/, "
                    "text_encoder/ and tokenizer/"
                )
        return model, True
    if os.path.exists(model) or model.startswith((".", "/")):
        raise InputError(f"{model}: no such folder; give a diffusers folder or a hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = [f"{part}/*" for part in _PARTS] + ["*.json"]
    try:  # a model in the local hub cache loads from there, with or without network
        return snapshot_download(
            model, revision=revision, allow_patterns=patterns, local_files_only=True
        ), True
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise offline_error(model, revision)
    if from_pt:
        return snapshot_download(model, revision=revision, allow_patterns=patterns), True
    return model, False


def load(
    model: str = DEFAULT_MODEL,
    revision: str | None = DEFAULT_REVISION,
    dtype: str = "float32",
    from_pt: bool = False,
    attention: str = "plain",
    text_encoder: bool = True,
) -> StableDiffusion:
    """Load SD from a hub id + revision or a local diffusers folder (Flax or, with from_pt,
    PyTorch weights). Parameters are cast to `dtype`, which is also the computation dtype.
    text_encoder False: no text encoder or tokenizer (for prompt embeddings given directly;
    `embed` then refuses). A model that cannot be fetched or read is a one-line InputError."""
    _attention(attention)
    try:
        with _quiet():
            sd = _load(model, revision, dtype, from_pt, text_encoder)
        return sd.configure(attention=attention)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, InputError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot load Stable Diffusion from {model!r} (revision {revision}): {first}; "
            "give a local diffusers folder with --model (and --from_pt for PyTorch weights), "
            "or check the hub id, revision and network"
        ) from None


def _kind(where: str, rev, text_time: bool) -> tuple[str, bool]:
    """(prediction_type, zero_uncond) from the scheduler's config and model_index.json; a model
    without them predicts noise. The sampler's DDIM schedule is SD's, so a scheduler with other
    betas is refused."""
    try:
        sched = FlaxDDIMScheduler.load_config(where, subfolder="scheduler", revision=rev)
    except OSError:
        sched = {}
    betas = (
        sched.get("beta_schedule", "scaled_linear"),
        sched.get("beta_start", 0.00085),
        sched.get("beta_end", 0.012),
        sched.get("num_train_timesteps", 1000),
    )
    if betas[0] != "scaled_linear" or not np.allclose(betas[1:], (0.00085, 0.012, 1000)):
        raise InputError(
            f"{where}: the scheduler's betas {betas} are not Stable Diffusion's (scaled_linear, "
            "0.00085, 0.012, 1000), the only schedule the sampler implements"
        )
    try:
        index = FlaxDiffusionPipeline.load_config(where, revision=rev)
    except OSError:
        index = {}
    zero = bool(index.get("force_zeros_for_empty_prompt", True)) and text_time
    return sched.get("prediction_type", "epsilon"), zero


def _load(model, revision, dtype, from_pt, with_text: bool = True) -> StableDiffusion:
    _dtype(dtype)
    where, local = _resolve(model, revision, from_pt, with_text)
    rev = None if local else revision
    if from_pt:
        root = Path(where)
        unet = FlaxUNet2DConditionModel.from_config(
            FlaxUNet2DConditionModel.load_config(where, subfolder="unet")
        )
        vae = FlaxAutoencoderKL.from_config(FlaxAutoencoderKL.load_config(where, subfolder="vae"))
        params = {}
    else:
        unet, unet_p = FlaxUNet2DConditionModel.from_pretrained(
            where, subfolder="unet", revision=rev
        )
        vae, vae_p = FlaxAutoencoderKL.from_pretrained(where, subfolder="vae", revision=rev)
        params = {"unet": unet_p, "vae": vae_p}
    text_time = unet.config.get("addition_embed_type") == "text_time"
    if text_time and with_text and local:
        for part in ("text_encoder_2", "tokenizer_2"):
            if not (Path(where) / part).is_dir():
                raise InputError(
                    f"{model}: an SDXL UNet (addition_embed_type text_time) but no {part}/ "
                    "subfolder; an SDXL folder holds text_encoder_2/ and tokenizer_2/ too"
                )
    prediction_type, zero_uncond = _kind(where, rev, text_time)
    encoders = [("text", "text_encoder", "tokenizer", FlaxCLIPTextModel)]
    if text_time:
        encoders.append(
            ("text_2", "text_encoder_2", "tokenizer_2", FlaxCLIPTextModelWithProjection)
        )
    texts = {}  # name -> (module, tokenizer)
    for name, sub, tok, cls in encoders if with_text else ():
        tokenizer = CLIPTokenizer.from_pretrained(where, subfolder=tok, revision=rev)
        if from_pt:
            module = cls(CLIPTextConfig.from_pretrained(where, subfolder=sub), _do_init=False)
            params[name] = _transformers_from_pt(
                _float32(read_torch_weights(root / sub)), _Shapes(module, _param_shapes(module))
            )
        else:
            module = cls.from_pretrained(where, subfolder=sub, revision=rev, _do_init=False)
            module, params[name] = module if isinstance(module, tuple) else (module, module.params)
        texts[name] = module, tokenizer
    if from_pt:
        for name, m in (("unet", unet), ("vae", vae)):
            state = {k: _Tensor(v) for k, v in _float32(read_torch_weights(root / name)).items()}
            params[name] = _diffusers_from_pt(state, _Shapes(m, _param_shapes(m)))
    text, tokenizer = texts.get("text", (None, None))
    text_2 = (texts["text_2"][0].config, texts["text_2"][1]) if "text_2" in texts else None
    return build(
        unet.config,
        vae.config,
        None if text is None else text.config,
        tokenizer,
        params,
        dtype,
        text_2=text_2,
        prediction_type=prediction_type,
        zero_uncond=zero_uncond,
    )

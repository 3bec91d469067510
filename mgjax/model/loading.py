"""Stable Diffusion from and to diffusers-format folders.

`load` reads SD 1.x, SD 2.x-style v-prediction models and SDXL (the UNet, the VAE, the CLIP
text encoder(s) and tokenizer(s)) from

* a hub id and revision (`CompVis/stable-diffusion-v1-4`, revision `flax` or `bf16`),
* a local diffusers-format folder holding Flax weights (offline), or
* a local (or hub) diffusers-format folder holding PyTorch weights (`from_pt=True`), read
  without torch (mgjax.model.weights).

The kind is read from the model's configs: the UNet's `addition_embed_type` "text_time" means
SDXL's conditioning (two text encoders, pooled embedding, size time ids), the scheduler's
`prediction_type` "v_prediction" a model whose output `eps` converts to a noise estimate.
`save` writes a folder `load` reads offline.
"""

import json
import os
from pathlib import Path

import numpy as np

from flow.errors import InputError
from mgjax.model.libraries import (
    CLIPTextConfig,
    CLIPTokenizer,
    FlaxAutoencoderKL,
    FlaxCLIPTextModel,
    FlaxCLIPTextModelWithProjection,
    FlaxDDIMScheduler,
    FlaxDiffusionPipeline,
    FlaxUNet2DConditionModel,
    quiet,
    unpinned,
)
from mgjax.model.modelinfo import hub_reachable, offline_error
from mgjax.model.schedule import BETA_END, BETA_START, TRAIN_STEPS
from mgjax.model.stable_diffusion import StableDiffusion, build, check_attention, check_dtype
from mgjax.model.weights import text_encoder_from_pt, unet_or_vae_from_pt

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_REVISION = "flax"


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


def resolve(
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
    check_attention(attention)
    try:
        with quiet():
            sd = _load(model, revision, dtype, from_pt, text_encoder)
        return sd.configure(attention=attention)
    except (OSError, ValueError, KeyError, RecursionError) as e:
        if isinstance(e, InputError):
            raise
        # RecursionError: a config.json nested thousands deep
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot load Stable Diffusion from {model!r} (revision {revision}): {first}; "
            "give a local diffusers folder with --model (and --from_pt for PyTorch weights), "
            "or check the hub id, revision and network"
        ) from None


def kind(where: str, rev, text_time: bool) -> tuple[str, bool]:
    """(prediction_type, zero_uncond) from the scheduler's config and model_index.json; a model
    without them predicts noise. The sampler's DDIM schedule is SD's, so a scheduler with other
    betas is refused."""
    try:
        sched = FlaxDDIMScheduler.load_config(where, subfolder="scheduler", revision=rev)
    except OSError:
        sched = {}
    betas = (
        sched.get("beta_schedule", "scaled_linear"),
        sched.get("beta_start", BETA_START),
        sched.get("beta_end", BETA_END),
        sched.get("num_train_timesteps", TRAIN_STEPS),
    )
    if betas[0] != "scaled_linear" or not np.allclose(
        betas[1:], (BETA_START, BETA_END, TRAIN_STEPS)
    ):
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
    check_dtype(dtype)
    where, local = resolve(model, revision, from_pt, with_text)
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
    prediction_type, zero_uncond = kind(where, rev, text_time)
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
            params[name] = text_encoder_from_pt(module, root / sub)
        else:
            module = cls.from_pretrained(where, subfolder=sub, revision=rev, _do_init=False)
            module, params[name] = module if isinstance(module, tuple) else (module, module.params)
        texts[name] = module, tokenizer
    if from_pt:
        for name, m in (("unet", unet), ("vae", vae)):
            params[name] = unet_or_vae_from_pt(m, root / name)
    params = unpinned(params)
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


def save(sd: StableDiffusion, folder) -> None:
    """Write a diffusers-format folder with Flax weights (loadable by `load` offline)."""
    folder = Path(folder)
    with quiet():
        sd.unet.save_pretrained(folder / "unet", params=sd.params["unet"])
        sd.vae.save_pretrained(folder / "vae", params=sd.params["vae"])
        sd.text_encoder.save_pretrained(folder / "text_encoder", params=sd.params["text"])
        sd.tokenizer.save_pretrained(folder / "tokenizer")
        if sd.text_encoder_2 is not None:
            sd.text_encoder_2.save_pretrained(folder / "text_encoder_2", params=sd.params["text_2"])
            sd.tokenizer_2.save_pretrained(folder / "tokenizer_2")
        FlaxDDIMScheduler(  # SD's schedule, as the sampler's DDIM module computes it
            beta_start=BETA_START,
            beta_end=BETA_END,
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


def load_autoencoder(folder) -> StableDiffusion:
    """The autoencoder alone, from a diffusers AutoencoderKL folder (a model folder's vae/), in
    float32: a StableDiffusion without UNet or text encoder, whose `encode`, `decode` and
    `posterior` work."""
    if not os.path.isfile(os.path.join(folder, "config.json")):  # a folder, never a hub name
        raise InputError(
            f"{folder}: not a diffusers AutoencoderKL folder (no config.json); give a model "
            "folder's vae/"
        )
    try:
        with quiet():
            vae, params = FlaxAutoencoderKL.from_pretrained(str(folder))
    except (OSError, ValueError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load an autoencoder from {folder}: {first}") from None
    return StableDiffusion(None, vae, None, None, {"vae": unpinned(params)})

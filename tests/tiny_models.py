"""Tiny random-init Stable Diffusion for tests and benches: the SD v1.x classes at toy size
(4-channel latents, VAE factor 4, 32-d text, a few MB of parameters) and a CLIP tokenizer over a
byte-level vocabulary."""

import json
import tempfile
from pathlib import Path

from mgjax.model import sd as sdm

TINY_UNET = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention_head_dim=8,
    cross_attention_dim=32,
)
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=128,
)
TINY_CLIP = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
    bos_token_id=512,
    eos_token_id=513,
    pad_token_id=513,
)


def tiny_tokenizer(folder) -> Path:
    """Writes a CLIP tokenizer folder: every byte as a token, alone and word-final, no merges,
    then start/end (ids 512/513, as in TINY_CLIP); prompts pad to 77 tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = sdm.byte_symbols()
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = dict(model_max_length=77, pad_token="<|endoftext|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def tiny(seed: int = 0, dtype: str = "float32", attention: str = "plain") -> sdm.StableDiffusion:
    """The tiny models with random parameters drawn from `seed`."""
    with tempfile.TemporaryDirectory() as d:
        folder = tiny_tokenizer(d)
        return sdm.random_init(TINY_UNET, TINY_VAE, TINY_CLIP, folder, seed, dtype, attention)


# SDXL's UNet at toy size: the text_time added conditions (pooled projection + 6 time ids, each
# embedded in 8 channels), cross-attention over both encoders' hidden states (32 + 32), two
# transformer layers in the second block as SDXL has several per block, linear projections.
TINY_SDXL_UNET = dict(
    TINY_UNET,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
)
TINY_SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025)  # SDXL's VAE scaling factor
# SD's DDIM scheduler settings with a v-prediction UNet (SD 2.x-style)
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def torch_folder(folder, kind: str, seed: int = 0) -> dict:
    """Writes a diffusers-format folder of tiny PyTorch models of the real classes and returns
    them by name. kind "sdxl": UNet with text_time conditioning, CLIPTextModel +
    CLIPTextModelWithProjection and their tokenizers, model_index.json with
    force_zeros_for_empty_prompt, epsilon prediction; kind "v": the SD v1 classes with a
    v-prediction scheduler."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    sdxl = kind == "sdxl"
    models = dict(
        unet=UNet2DConditionModel(**(TINY_SDXL_UNET if sdxl else TINY_UNET)).eval(),
        vae=AutoencoderKL(**(TINY_SDXL_VAE if sdxl else TINY_VAE)).eval(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval(),
    )
    if sdxl:
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP)).eval()
    for name, model in models.items():
        model.save_pretrained(folder / name)  # safetensors
        if name.startswith("text_encoder"):
            tiny_tokenizer(folder / name.replace("text_encoder", "tokenizer"))
    prediction = "epsilon" if sdxl else "v_prediction"
    models["scheduler"] = DDIMScheduler(**SCHEDULER, prediction_type=prediction)
    models["scheduler"].save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"}
    if sdxl:
        index["force_zeros_for_empty_prompt"] = True
    (folder / "model_index.json").write_text(json.dumps(index))
    return models

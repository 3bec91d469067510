"""Tiny random-init Stable Diffusion for tests and benches: the SD v1.x classes at toy size
(4-channel latents, VAE factor 4, 32-d text, a few MB of parameters) and a CLIP tokenizer over a
byte-level vocabulary."""

import json
import tempfile
from pathlib import Path

from mgjax import sd as sdm

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

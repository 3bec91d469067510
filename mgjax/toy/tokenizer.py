"""The toy world's CLIP tokenizer: CLIP's byte-level BPE with merges that make each word of the
shapes world's prompts one token (any other text still tokenizes, byte by byte).

  folder = tokenizer_files("runs/ldm/tokenizer_build")   # vocab.json, merges.txt, config
"""

import itertools
import json
from pathlib import Path

import numpy as np

from mgjax.model import sd as sdm
from mgjax.toy import shapes

MAX_TOKENS = 24  # the longest prompt (two dotted objects) is 16 tokens with start and end


def _words() -> list[str]:
    fixed = ["a", "an", "and", "on", "background", "dotted"]
    return fixed + list(shapes.COLORS) + list(shapes.SHAPES) + list(shapes.PATTERNS)


def _bpe(word: str, ranks: dict) -> list[str]:
    """CLIP's BPE on one lower-case word (a copy of its merge loop, to search merge orders)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1e9), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        rank, i = min(pairs)
        if rank == 1e9:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_files(folder) -> Path:
    """Write a CLIP tokenizer folder (vocab.json, merges.txt, tokenizer_config.json) whose
    merges make each shapes-world word one token (the byte-level alphabet stays, so any text
    still tokenizes). Merge chains are built word by word, left to right; an order in which no
    word's chain is cut by another's is searched, and the tokenizer itself checks it once the
    models are built (`check_tokenizer`)."""
    chars = sdm.byte_symbols()
    words = _words()
    rng = np.random.default_rng(0)
    for _ in range(500):
        merges, seen = [], set()
        for w in words:
            parts = list(w[:-1]) + [w[-1] + "</w>"]
            left = parts[0]
            for p in parts[1:]:
                if (left, p) not in seen:
                    seen.add((left, p))
                    merges.append((left, p))
                left += p
        ranks = {m: i for i, m in enumerate(merges)}
        if all(_bpe(w, ranks) == [w + "</w>"] for w in words):
            break
        words = list(rng.permutation(words))
    else:
        raise RuntimeError("no merge order makes every word one token")
    vocab = chars + [c + "</w>" for c in chars]
    vocab += [a + b for a, b in merges if a + b not in vocab]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": MAX_TOKENS,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
    return folder


def check_tokenizer(tokenizer) -> None:
    for w in _words():
        if tokenizer.tokenize(w) != [w + "</w>"]:
            raise RuntimeError(f"the toy tokenizer splits {w!r}: {tokenizer.tokenize(w)}")

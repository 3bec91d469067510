"""The model seam: Stable Diffusion as the layers above see it, and the only code that imports
diffusers and transformers (import-linter's contract "seam", pyproject.toml).

sd                the public surface: StableDiffusion, load, save, random_init, build, ...
stable_diffusion  the seam object (eps, decode, encode, embed) and `build` from configs
loading           hub ids and diffusers folders: load, save, the autoencoder alone
weights           PyTorch weights read without torch and renamed to Flax parameters
random_init       models of the real classes with random weights; CLIP's byte symbols
libraries         diffusers/transformers imported once, their deprecation notices silenced
conditioning      prompt conditionings as opaque pytrees (SD 1.x, SDXL), v-prediction
schedule          the noise schedule SD was trained with
modelinfo         a model's latent grid from its config files, before any weight is read
levers            performance levers (attention, remat, loops) and the RAFT gradient choice
remat             rematerialization inside the diffusers models, block by block
clip              CLIP image embeddings (the evaluation's visual similarity)
"""

import os
import sys


def without_torch() -> None:
    """For a command line, before diffusers or transformers is imported (launch.py's main;
    `python -m mgjax.<command>` and bench scripts without a PyTorch peer as their package
    starts): both import PyTorch whenever it is installed (most of their import time), and
    nothing mgjax calls through them needs it (PyTorch weights are read without torch:
    `weights`).
    Marks torch absent for this process (an `import torch` fails) and for the commands it starts
    (USE_TORCH=0, which makes theirs do the same), unless torch is imported already or
    USE_TORCH asks for it. A library user's process, which may want torch, never calls it."""
    if "torch" in sys.modules:
        return
    # the libraries' own rule: torch is wanted only for these values (any other: not)
    if os.environ.setdefault("USE_TORCH", "0").upper() not in ("1", "ON", "YES", "TRUE", "AUTO"):
        sys.modules["torch"] = None  # diffusers' logging imports it whatever USE_TORCH says

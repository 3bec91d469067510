"""diffusers and transformers, imported here once with their deprecation notices silenced.

diffusers 0.39 and transformers 4.x log a deprecation notice from every Flax class they define
and every Flax module's `setup()`; the seam's calls into them run under `quiet()`, which
silences those notices for the duration of the call and changes nothing else. Their Flax
`from_pretrained` pins every weight to the host CPU; `unpinned` frees them.
"""

import contextlib
import logging
import warnings
from collections.abc import Iterator

import diffusers
import transformers

# The libraries' root loggers; getting them sets their levels from DIFFUSERS_VERBOSITY and
# TRANSFORMERS_VERBOSITY (default: warning), which quiet() restores after each call.
_LOGGERS = (
    diffusers.utils.logging.get_logger("diffusers"),
    transformers.utils.logging.get_logger("transformers"),
)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
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


def unpinned(tree):
    """The weights a Flax `from_pretrained` returns, free to live where the computation runs.
    diffusers' and transformers' loaders `device_put` every weight on the host's CPU device,
    which commits it there, and a jitted function runs on the device of its committed
    arguments: on a GPU or TPU host, an edit or a training step given those weights would run
    on the host's CPU. They come back as uncommitted arrays on the default device, which `jit`
    and the batch shardings place as they need."""
    import jax
    import numpy as np

    return jax.device_put(jax.tree_util.tree_map(np.asarray, tree))


with quiet():  # the Flax classes log their deprecation notice as they are defined
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxDDIMScheduler,
        FlaxDiffusionPipeline,
        FlaxUNet2DConditionModel,
    )
    from diffusers.models.modeling_flax_pytorch_utils import (
        convert_pytorch_state_dict_to_flax as diffusers_from_pt,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTokenizer,
        FlaxCLIPTextModel,
        FlaxCLIPTextModelWithProjection,
    )
    from transformers.modeling_flax_pytorch_utils import (
        convert_pytorch_state_dict_to_flax as transformers_from_pt,
    )
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

__all__ = [
    "CLIPTextConfig",
    "CLIPTokenizer",
    "FlaxAutoencoderKL",
    "FlaxCLIPTextModel",
    "FlaxCLIPTextModelWithProjection",
    "FlaxDDIMScheduler",
    "FlaxDiffusionPipeline",
    "FlaxUNet2DConditionModel",
    "bytes_to_unicode",
    "diffusers_from_pt",
    "quiet",
    "transformers_from_pt",
    "unpinned",
]

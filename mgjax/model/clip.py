"""CLIP image embeddings (the evaluation's visual similarity) with transformers' Flax CLIP and
its own image processor. transformers is imported when a model is loaded, not with this module."""

import numpy as np

from flow.errors import InputError


class Clip:
    """CLIP image embeddings with transformers' Flax CLIP and its image processor."""

    def __init__(self, name: str, revision: str | None = None):
        from transformers import CLIPImageProcessor, FlaxCLIPModel

        from mgjax.model.libraries import unpinned

        try:
            self.model = FlaxCLIPModel.from_pretrained(name, revision=revision)
            self.model.params = unpinned(self.model.params)  # else it runs on the host's CPU
            self.processor = CLIPImageProcessor.from_pretrained(name, revision=revision)
        except (OSError, ValueError) as e:
            raise InputError(
                f"--clip_model {name}: cannot load it ({str(e).splitlines()[0][:160]}); give a "
                "local folder with a CLIP model, or --no_clip"
            ) from None

    def embed(self, images_u8: list[np.ndarray]) -> np.ndarray:
        pixels = self.processor(images=images_u8, return_tensors="np")["pixel_values"]
        feats = np.asarray(self.model.get_image_features(pixel_values=pixels), np.float64)
        return feats / np.linalg.norm(feats, axis=-1, keepdims=True)

    def similarity(self, a_u8: np.ndarray, b_u8: np.ndarray) -> float:
        ea, eb = self.embed([a_u8, b_u8])
        return float(ea @ eb)

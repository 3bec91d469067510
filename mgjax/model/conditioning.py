"""Prompt conditionings as opaque pytrees, how prompts become them (`encode_prompts`: SD 1.x's
hidden states; SDXL's two encoders, pooled embedding and time ids), and the prediction-type
conversion.

A conditioning is whatever the model seam's `embed` returns and its `eps` takes: for SD 1.x/2.x
the text encoder's hidden states f32[B,L,D]; for SDXL a dict of the concatenated hidden states,
the pooled embedding and the size/crop time ids. Every leaf has the batch first, so the guided
sampler, inversion and batching handle any backbone's conditioning with these pytree maps and
never look inside.
"""

import jax
import jax.numpy as jnp
import numpy as np

from flow.errors import InputError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def broadcast(cond, batch: int, dtype=jnp.float32):
    """Each leaf [1 or batch, ...] as [batch, ...] in `dtype`."""

    def one(c):
        c = jnp.asarray(c, dtype)
        if c.ndim == 0 or c.shape[0] not in (1, batch):
            raise InputError(
                f"prompt conditioning has shape {c.shape}; its first axis must be 1 or the "
                f"batch ({batch})"
            )
        return jnp.broadcast_to(c, (batch,) + c.shape[1:])

    return jax.tree_util.tree_map(one, cond)


def concat(conds, module=jnp):
    """The conditionings' leaves concatenated along the batch (jnp, or np on the host)."""
    return jax.tree_util.tree_map(lambda *c: module.concatenate(c), *conds)


def host(cond):
    """The conditioning with numpy leaves."""
    return jax.tree_util.tree_map(np.asarray, cond)


def eps_from_v(v, z, abar):
    """The noise estimate of a v-prediction model (Salimans & Ho 2022, "progressive
    distillation", sec. 4): with z = sqrt(abar) x0 + sqrt(1 - abar) eps and
    v = sqrt(abar) eps - sqrt(1 - abar) x0,

        eps = sqrt(abar) v + sqrt(1 - abar) z.

    v, z f32[B,C,h,w]; abar f32[B] or a scalar."""
    abar = jnp.reshape(jnp.asarray(abar, z.dtype), (-1,) + (1,) * (z.ndim - 1))
    return jnp.sqrt(abar) * v + jnp.sqrt(1.0 - abar) * z


def time_ids(height: int, width: int, batch: int = 1) -> np.ndarray:
    """SDXL's size conditioning f32[batch,6]: original size (H, W), crop top-left (0, 0), target
    size (H, W), as diffusers' SDXL pipelines build it for an uncropped image."""
    return np.tile(np.asarray([height, width, 0, 0, height, width], np.float32), (batch, 1))


def encode_prompts(sd, prompts: list[str]) -> tuple[np.ndarray, ...]:
    """Prompts through the text encoder(s) of `sd` (mgjax.model.sd.StableDiffusion): (hidden
    states f32[N,L,D],) or, for SDXL, (both encoders' penultimate hidden states concatenated,
    the second encoder's pooled projection f32[N,P])."""

    def ids(tokenizer):
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="np",
        ).input_ids

    if not sd.text_time:
        out = sd.text_encoder(ids(sd.tokenizer), params=sd.params["text"])[0]
        return (np.asarray(out, np.float32),)
    # SDXL (diffusers' SDXL pipelines): each encoder's penultimate hidden states, then the
    # second encoder's pooled projection
    one = sd.text_encoder(ids(sd.tokenizer), params=sd.params["text"], output_hidden_states=True)
    two = sd.text_encoder_2(
        ids(sd.tokenizer_2), params=sd.params["text_2"], output_hidden_states=True
    )
    text = np.concatenate(
        [np.asarray(one.hidden_states[-2]), np.asarray(two.hidden_states[-2])], axis=-1
    ).astype(np.float32)
    pooled = np.array(two.text_embeds, np.float32)
    if sd.zero_uncond:
        empty = np.asarray([p == "" for p in prompts])
        text[empty], pooled[empty] = 0.0, 0.0
    return text, pooled

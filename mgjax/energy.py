"""The Motion Guidance energy: flow L1 + occlusion-masked colour L1 (Geng & Owens, Sec. 3)."""

from typing import NamedTuple

import jax.numpy as jnp

from flow.raft import Raft
from flow.sampling import warp


class EnergyWeights(NamedTuple):
    flow: float = 3.0  # lambda_flow
    color: float = 100.0  # lambda_color


PAPER_WEIGHTS = EnergyWeights()


def occlusion_mask(target_flow: jnp.ndarray) -> jnp.ndarray:
    """1 = use in the colour loss, 0 = background that the moving object will cover.

    A pixel gets 0 exactly when its target flow is zero and some moving pixel p lands on it:
    it is a bilinear neighbour, with non-zero weight, of p + f(p). Moving pixels keep 1.

    Args:
      target_flow: f32[B,H,W,2] in pixels (dx, dy), defined on the source frame.
    Returns:
      f32[B,H,W,1].
    """
    b, h, w, _ = target_flow.shape
    moving = jnp.any(target_flow != 0, axis=-1)  # bool[B,H,W]
    ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    tx, ty = xs + target_flow[..., 0], ys + target_flow[..., 1]
    x0, y0 = jnp.floor(tx), jnp.floor(ty)
    fx, fy = tx - x0, ty - y0
    covered = jnp.zeros((b, h * w), bool)
    batch = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, h, w))
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        cx, cy = x0 + dx, y0 + dy
        hit = moving & (weight > 0) & (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        idx = jnp.clip(cy, 0, h - 1).astype(jnp.int32) * w + jnp.clip(cx, 0, w - 1).astype(
            jnp.int32
        )
        covered = covered.at[batch, idx].max(hit)
    covered = covered.reshape(b, h, w)
    return jnp.where(covered & ~moving, 0.0, 1.0)[..., None]


def motion_energy(
    edit: jnp.ndarray,
    source: jnp.ndarray,
    target_flow: jnp.ndarray,
    mask: jnp.ndarray,
    raft: Raft,
    weights: EnergyWeights = PAPER_WEIGHTS,
    raft_iters: int = 5,
    oracle: bool = False,
) -> tuple[jnp.ndarray, dict]:
    """E = lambda_flow * L_flow + lambda_color * L_color for one batch of edits.

    Args:
      edit: f32[B,H,W,3] decoded one-step estimate, in [0, 1] (not clamped).
      source: f32[B,H,W,3] source image x*, in [0, 1].
      target_flow: f32[B,H,W,2] target flow f.
      mask: f32[B,H,W,1] occlusion mask (occlusion_mask(f), or ones to switch masking off).
      raft: RAFT called as RAFT(source, edit) on [0, 255] images.
      oracle: warp with the target flow instead of RAFT's flow in the colour loss.
    Returns:
      (E summed over the batch, {"energy", "flow_loss", "color_loss"} per image, f32[B]).
    """
    flow = raft(255.0 * source, 255.0 * edit, iters=raft_iters)
    flow_loss = jnp.abs(flow - target_flow).mean(axis=(1, 2, 3))  # per-component L1 mean
    warped = warp(edit, target_flow if oracle else flow, padding="reflection")
    color_loss = jnp.abs(mask * source - mask * warped).mean(axis=(1, 2, 3))  # masked in mean
    energy = weights.flow * flow_loss + weights.color * color_loss
    return energy.sum(), {"energy": energy, "flow_loss": flow_loss, "color_loss": color_loss}

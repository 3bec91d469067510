"""Shared pieces of the guided sampler's parity tests: a scene, our sampler's run and the PyTorch
transcription's run (tests/torch_reference.py) on the same weights and the same noise."""

import copy

import jax
import numpy as np
import pytest
import torch
import torchvision

from mgjax import config as C
from mgjax.method.guidance import eval_noise
from mgjax.method.sampler import Sampler
from tests.torch_raft import image_pair
from tests.torch_reference import ReferenceFlowLoss, reference_sample

H = W = 128  # torchvision RAFT's minimum; tiny VAE factor 4: latents 4x32x32


def scene(seed=0):
    """A textured source image in [0, 1] and a square moved 6 px right, 4 px down."""
    a, _ = image_pair(1, H, W, seed=seed)
    flow = np.zeros((1, H, W, 2), np.float32)
    flow[:, 40:88, 32:80] = (6.0, 4.0)
    return a / 255.0, flow


def to_torch(x):
    return torch.from_numpy(np.array(x))


def split_conditioning(cond):
    """(encoder hidden states, diffusers' added_cond_kwargs or None) of a conditioning pytree,
    as diffusers' PyTorch UNet takes them."""
    if not isinstance(cond, dict):
        return cond, None
    return cond["text"], {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}


def reference_run(
    models,
    cfg,
    img,
    flow,
    frozen,
    traj,
    cond,
    uncond,
    z_T,
    keys,
    steps,
    double=False,
    prediction_type="epsilon",
    scaling_factor=0.18215,
):
    """The torch transcription on the same weights and noise (float64 copies if `double`);
    cfg: flat-named method settings; cond/uncond: our conditioning pytrees (numpy)."""
    cfg = C.make(**cfg).method
    unet, vae, raft = models["unet"], models["vae"], models["raft_t"]
    dt = torch.float64 if double else torch.float32
    if double:
        unet, vae, raft = (copy.deepcopy(m).double() for m in (unet, vae, raft))
    t = lambda x: to_torch(x).to(dt)  # noqa: E731
    energy = ReferenceFlowLoss(
        raft,
        t(flow).permute(0, 3, 1, 2),
        cfg.color_weight,
        cfg.flow_weight,
        cfg.oracle,
        cfg.occlusion_masking,
        iters=cfg.raft_iters,
    )
    np_dt = np.float64 if double else np.float32
    (cond, added_c), (uncond, added_u) = (split_conditioning(c) for c in (cond, uncond))
    added = None
    if added_c is not None:
        added = tuple(jax.tree_util.tree_map(t, a) for a in (added_u, added_c))

    def noise_fn(i, j):
        shape = z_T.shape
        return tuple(t(n) for n in eval_noise(keys, i, j, cfg.recursive_steps, shape, np_dt))

    inputs = []
    grid = torchvision.models.optical_flow.raft.make_coords_grid
    with pytest.MonkeyPatch.context() as mp:
        if double:  # torchvision builds its lookup grid with .float(); keep it float64
            mp.setattr(
                torchvision.models.optical_flow.raft,
                "make_coords_grid",
                lambda *a: grid(*a).double(),
            )
        torch.set_default_dtype(dt)
        try:
            z, logs = reference_sample(
                unet,
                vae,
                energy,
                t(img).permute(0, 3, 1, 2) * 2 - 1,
                t(cond),
                t(uncond),
                t(z_T),
                noise_fn,
                num_ddim_steps=cfg.steps,
                max_steps=steps,
                cached_latents=t(traj),
                edit_mask=to_torch(frozen),
                num_recursive_steps=cfg.recursive_steps,
                clip_grad=cfg.clip,
                guidance_weight=cfg.guidance_weight,
                cfg_scale=cfg.cfg_scale,
                eta=cfg.eta,
                unet_inputs=inputs,
                added_cond=added,
                prediction_type=prediction_type,
                scaling_factor=scaling_factor,
            )
        finally:
            torch.set_default_dtype(torch.float32)
    return z.numpy(), logs, energy, inputs


def run_ours(sd, raft, cfg, img, flow, traj, frozen, cond, uncond, steps=3):
    """(final latents, logs name -> flat array, the prepared inputs, the final state) of our
    sampler over `steps` DDIM steps."""
    sampler = Sampler.of(sd, raft, **cfg)
    edit = sampler.prepare(img, flow, cond, uncond, frozen=frozen, trajectory=traj)
    state = sampler.init(edit, traj[0], seeds=7)
    state, logs, _ = sampler.run_chunk(edit, state, steps)
    return np.asarray(state.z), {k: np.asarray(v).reshape(-1) for k, v in logs.items()}, edit, state


# lambda_g = 30 rather than the paper's 300: with random tiny weights, 300 makes the guided
# map chaotic (two fp64 runs whose UNets differ by 1e-7 end 5e-3 apart after 6 evaluations),
# so the check would measure amplified rounding instead of the algorithm.
PARITY = dict(recursive_steps=2, guidance_weight=30.0, clip=7.7, chunk=3)

LOG_PAIRS = (
    ("energy", "losses"),
    ("flow_loss", "losses_flow"),
    ("color_loss", "losses_color"),
    ("noise_norm", "noise_norms"),
    ("guidance_norm", "guidance_norms"),
)

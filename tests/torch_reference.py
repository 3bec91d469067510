"""A PyTorch transcription of the reference Motion Guidance sampler, for parity tests.

It follows the authors' `DDIMSamplerWithGrad.sample` and `FlowLoss` statement by statement
(NCHW, images in [-1, 1], the guidance gradient negated and subtracted, clipping on
||sqrt(1 - abar) grad||), on diffusers' PyTorch UNet2DConditionModel / AutoencoderKL and
torchvision RAFT. Its schedule is computed in float64 like the ldm code, and its occlusion mask
with the reference's gradient trick, so neither shares code with mgjax. Noise comes from a
callback, so both sides can be fed the same draws. Two deliberate differences from the
reference, both settled by MOTION_GUIDANCE.md: the mask's warp ignores landings outside the
frame (the reference reflects them back in), and torchvision RAFT takes [-1, 1] inputs.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F


def reference_schedule(num_steps: int, eta: float = 0.0):
    """ldm's make_ddim_timesteps / make_ddim_sampling_parameters for SD's scaled-linear betas."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0).numpy()
    steps = np.arange(0, 1000, 1000 // num_steps) + 1
    alphas = ac[steps]
    alphas_prev = np.asarray([ac[0]] + ac[steps[:-1]].tolist())
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
    f = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    return steps, f(alphas), f(alphas_prev), f(sigmas)


def normalize_flow(flow):
    """Pixel offsets (B,2,H,W) -> absolute grid_sample coordinates (B,H,W,2) in [-1, 1]."""
    _, _, h, w = flow.shape
    dev = flow.device
    ys, xs = torch.meshgrid(torch.arange(h, device=dev), torch.arange(w, device=dev), indexing="ij")
    pos = flow + torch.stack([xs, ys]).float()[None]
    size = torch.tensor([w, h], device=dev).float()
    return (-1 + 2.0 * pos / (size - 1)[:, None, None]).permute(0, 2, 3, 1)


def warp(im, flow, padding_mode="reflection"):
    return F.grid_sample(im, normalize_flow(flow), padding_mode=padding_mode, align_corners=True)


class ReferenceFlowLoss:
    """losses.FlowLoss: flow L1 + (occlusion-masked) colour L1, RAFT(source, edit)."""

    def __init__(
        self,
        raft,
        target_flow,
        color_weight,
        flow_weight,
        oracle,
        occlusion_masking,
        iters=5,
        autocast=False,
    ):
        self.raft = copy.deepcopy(raft).train()  # the reference never calls .eval() on RAFT
        self.autocast = autocast  # RAFT under fp16 autocast, as the reference ran it on CUDA
        self.target_flow = target_flow
        self.color_weight, self.flow_weight = color_weight, flow_weight
        self.oracle, self.occlusion_masking, self.iters = oracle, occlusion_masking, iters
        with torch.enable_grad():
            tgt = target_flow.clone().requires_grad_(True)
            warped = warp(tgt, tgt, padding_mode="zeros")
            masked = warped * (tgt != warped)
            grad = torch.autograd.grad(masked.sum(), tgt)[0]
        self.mask_occ = 1 - (grad.abs().sum(1, keepdim=True) != 0).float()
        self.mask_occ[target_flow.abs().sum(1, keepdim=True) != 0] = 1

    def __call__(self, pred, target):
        target, pred = target / 2.0 + 0.5, pred / 2.0 + 0.5
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast):
            flow = self.raft(2 * target - 1, 2 * pred - 1, num_flow_updates=self.iters)[-1]
        flow = flow.float()
        flow_loss = F.l1_loss(self.target_flow, flow)
        warped = warp(pred, self.target_flow if self.oracle else flow)
        if self.occlusion_masking:
            color_loss = F.l1_loss(target * self.mask_occ, warped * self.mask_occ)
        else:
            color_loss = F.l1_loss(target, warped)
        loss = self.flow_weight * flow_loss + self.color_weight * color_loss
        return loss, {"flow_loss": flow_loss.item(), "color_loss": color_loss.item()}


def reference_sample(
    unet,
    vae,
    energy,
    src_img,
    cond_embed,
    uncond_embed,
    start_zt,
    noise_fn,
    *,
    num_ddim_steps=500,
    max_steps=None,
    cached_latents=None,
    edit_mask=None,
    num_recursive_steps=1,
    clip_grad=0.0,
    guidance_weight=1.0,
    guidance_schedule=None,
    cfg_scale=7.5,
    eta=0.0,
    tgt_z0=None,
    unet_inputs=None,
    added_cond=None,
    prediction_type="epsilon",
    scaling_factor=0.18215,
):
    """DDIMSamplerWithGrad.sample. noise_fn(i, j) -> (source, eta, recursive) noise tensors.
    `unet_inputs`, if a list, collects each guided evaluation's UNet input latent.

    Extended beyond SD v1.4 to other backbones, as diffusers' pipelines call them:
    `added_cond` (uncond, cond) dicts of SDXL's added conditions (text_embeds, time_ids), the
    UNet's `prediction_type` ("v_prediction": the noise is sqrt(a_t) v + sqrt(1 - a_t) z, the
    eps form of diffusers' DDIMScheduler) and the VAE's `scaling_factor`."""
    steps, alphas, alphas_prev, sigmas = reference_schedule(num_ddim_steps, eta)
    time_range = np.flip(steps)
    total = len(steps)
    if guidance_schedule is None:
        guidance_schedule = np.ones(total)
    b = start_zt.shape[0]
    noisy_latent = start_zt.clone()
    logs = {
        k: [] for k in ("losses", "losses_flow", "losses_color", "noise_norms", "guidance_norms")
    }
    for i, step in enumerate(time_range[:max_steps]):
        index = total - 1 - i
        ts = torch.full((b,), int(step), dtype=torch.long, device=start_zt.device)
        a_t, a_prev = alphas[index], alphas_prev[index]
        sigma_t = sigmas[index]
        sqrt_one_minus_at = (1 - a_t).sqrt()
        beta_t = a_t / a_prev
        for j in range(num_recursive_steps):
            n_src, n_eta, n_rec = noise_fn(i, j)
            if cached_latents is not None:
                gt_latent = cached_latents[i]
            else:
                gt_latent = a_t.sqrt() * tgt_z0 + (1 - a_t).sqrt() * n_src
            if edit_mask is not None:
                noisy_latent[edit_mask] = gt_latent[edit_mask]
            if unet_inputs is not None:
                unet_inputs.append(noisy_latent.clone())
            with torch.enable_grad():
                z = noisy_latent.detach().requires_grad_(True)
                extra = {}
                if added_cond is not None:
                    extra["added_cond_kwargs"] = {
                        k: torch.cat([added_cond[0][k], added_cond[1][k]]) for k in added_cond[1]
                    }
                out = unet(
                    torch.cat([z] * 2),
                    torch.cat([ts] * 2),
                    encoder_hidden_states=torch.cat([uncond_embed, cond_embed]),
                    **extra,
                ).sample
                if prediction_type == "v_prediction":
                    out = a_t.sqrt() * out + sqrt_one_minus_at * torch.cat([z] * 2)
                e_u, e_c = out.chunk(2)
                e_t = e_u + cfg_scale * (e_c - e_u)
                pred_x0 = (z - sqrt_one_minus_at * e_t) / a_t.sqrt()
                recons = vae.decode(pred_x0 / scaling_factor).sample
                loss, info = energy(recons, src_img)
                grad = torch.autograd.grad(loss, z)[0]
            e_t = e_t.detach()
            grad = -grad * guidance_weight * guidance_schedule[i]
            if clip_grad != 0:
                grad_norm = torch.linalg.norm(sqrt_one_minus_at * grad)
                if grad_norm > clip_grad:
                    grad = grad / grad_norm * clip_grad
            e_t = e_t - sqrt_one_minus_at * grad
            logs["losses"].append(loss.item())
            logs["losses_flow"].append(info["flow_loss"])
            logs["losses_color"].append(info["color_loss"])
            logs["noise_norms"].append(torch.linalg.norm(e_t).item())
            logs["guidance_norms"].append(torch.linalg.norm(sqrt_one_minus_at * grad).item())
            with torch.no_grad():
                pred_x0 = (noisy_latent - sqrt_one_minus_at * e_t) / a_t.sqrt()
                dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
                prev = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * n_eta
                noisy_latent = beta_t.sqrt() * prev + (1 - beta_t).sqrt() * n_rec
        noisy_latent = prev
    return noisy_latent, {k: np.asarray(v) for k, v in logs.items()}

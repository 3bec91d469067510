"""torchvision RAFT references for the tests: random weights, random BatchNorm statistics."""

import copy

import numpy as np
import torch
import torchvision


def random_torchvision_raft(small: bool, seed: int = 0) -> torch.nn.Module:
    """torchvision raft_small/raft_large with seeded random weights and non-trivial BN stats."""
    torch.manual_seed(seed)
    factory = (
        torchvision.models.optical_flow.raft_small
        if small
        else torchvision.models.optical_flow.raft_large
    )
    model = factory(weights=None)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0.0, 0.5)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
        for name, p in model.named_parameters():
            if name.endswith("bias") or (p.ndim == 1 and "weight" in name):
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.1)
    return model.eval()


def torch_flow(model, image1: np.ndarray, image2: np.ndarray, iters: int, train: bool = False):
    """RAFT flow f32[B,H,W,2] from NHWC [0,255] numpy images (torchvision takes [-1,1] NCHW)."""
    if train:  # train() updates the BatchNorm running statistics: keep the caller's model intact
        model = copy.deepcopy(model).train()
    t1, t2 = (torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0 for x in (image1, image2))
    with torch.no_grad():
        flow = model(t1, t2, num_flow_updates=iters)[-1]
    return flow.permute(0, 2, 3, 1).numpy()


def image_pair(b: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A textured image and a shifted, noisy copy (so RAFT has something to track)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = 127.5 + 60 * np.sin(xx[..., None] / 5.0 + np.arange(3)) * np.cos(yy[..., None] / 7.0)
    a = np.clip(base[None] + rng.normal(0, 20, (b, h, w, 3)), 0, 255).astype(np.float32)
    b2 = np.roll(a, (2, 3), axis=(1, 2)) + rng.normal(0, 5, a.shape)
    return a, np.clip(b2, 0, 255).astype(np.float32)

"""RAFT (Teed & Deng, ECCV 2020) as pure functions over explicit weights (upstream core/raft.py)."""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from flow import corr as corr_lib
from flow.errors import InputError
from flow.extractor import Encoder
from flow.sampling import coords_grid
from flow.update import MaskHead, UpdateBlock

CONTEXT_NORMS = ("batch", "running")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


@dataclasses.dataclass(frozen=True)
class RaftConfig:
    """Static description of a RAFT network; hashable, so it can sit in a jit cache key."""

    small: bool = False
    context_norm: str = "batch"  # "batch" (per-image statistics) or "running" (eval mode)
    # Compute dtype of the convolutions: "float32" or "bfloat16" (coordinates, correlation and
    # norm statistics stay fp32). "float64" (with jax_enable_x64) is for exact gradient tests.
    dtype: str = "float32"
    # Images are bilinearly upsampled by this factor before the network and the flow is
    # average-pooled back (and divided by it): a finer 1/8-resolution grid for small images.
    input_scale: int = 1
    # Upstream RAFT detaches the flow estimate at every refinement iteration, so gradients reach
    # image2 only through the last lookup's correlation values (the Motion Guidance reference
    # runs it so). False keeps the whole unrolled graph: the exact gradient of the output.
    detach: bool = True

    def __post_init__(self):
        if self.context_norm not in CONTEXT_NORMS:
            raise InputError(
                f"context_norm must be one of {CONTEXT_NORMS}, got {self.context_norm!r}"
            )
        if self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.input_scale not in (1, 2, 4):
            raise InputError(f"input_scale must be 1, 2 or 4, got {self.input_scale}")
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise InputError("dtype float64 needs jax_enable_x64 (with jax.enable_x64(True): ...)")

    @property
    def acc_dtype(self):
        """dtype of coordinates, correlation and the returned flow."""
        return jnp.float64 if self.dtype == "float64" else jnp.float32

    @property
    def hidden_dim(self) -> int:
        return 96 if self.small else 128

    @property
    def context_dim(self) -> int:
        return 64 if self.small else 128

    @property
    def radius(self) -> int:
        return 3 if self.small else 4

    levels = 4

    def modules(self):
        """(fnet, cnet, update_block, mask_head or None) Flax modules for this config."""
        d = DTYPES[self.dtype]
        fnet = Encoder(128 if self.small else 256, "instance", self.small, d)
        cnorm = "none" if self.small else self.context_norm
        cnet = Encoder(self.hidden_dim + self.context_dim, cnorm, self.small, d)
        mask = None if self.small else MaskHead(d)
        return fnet, cnet, UpdateBlock(self.small, d), mask


def check_images(image1, image2) -> None:
    """Rejects image pairs RAFT cannot take, with a message that says what fits."""
    s1, s2 = tuple(image1.shape), tuple(image2.shape)
    if len(s1) != 4 or s1[-1] != 3:
        raise InputError(f"images must be (B, H, W, 3) RGB arrays, got shape {s1}")
    if s1 != s2:
        raise InputError(f"image1 and image2 must have the same shape, got {s1} and {s2}")
    h, w = s1[1:3]
    if h % 8 or w % 8:
        raise InputError(
            f"image height and width must be multiples of 8, got {h}x{w}; "
            f"crop or resize to {h // 8 * 8}x{w // 8 * 8}"
        )
    if h < 64 or w < 64:
        raise InputError(f"images must be at least 64x64 for the 4-level pyramid, got {h}x{w}")


def convex_upsample(flow: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """Flow at 1/8 resolution -> full: each fine pixel is a softmax-weighted mix of 3x3 coarse taps.

    Args:
      flow: f32[B,h,w,2]; mask: f32[B,h,w,576] logits, channel = tap*64 + sub_y*8 + sub_x.
    Returns:
      f32[B,8h,8w,2], in pixels of the full image.
    """
    b, h, w, _ = flow.shape
    weights = jax.nn.softmax(mask.reshape(b, h, w, 9, 8, 8), axis=3)
    padded = jnp.pad(8.0 * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.stack([padded[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=3)
    up = jnp.einsum("bhwkyx,bhwkc->bhywxc", weights, taps, precision=lax.Precision.HIGHEST)
    return up.reshape(b, 8 * h, 8 * w, 2)


def _interp_matrix(n_in: int, n_out: int, dtype=np.float32) -> np.ndarray:
    """Linear interpolation weights [n_out,n_in] with align_corners=True, computed in numpy
    `dtype` (float64 for a float64 network: torch computes them in the tensor's precision)."""
    pos = np.arange(n_out, dtype=dtype) * dtype((n_in - 1) / max(n_out - 1, 1))
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = pos - i0
    m = np.zeros((n_out, n_in), dtype)
    np.add.at(m, (np.arange(n_out), i0), 1 - frac)
    np.add.at(m, (np.arange(n_out), i1), frac)
    return m


def bilinear_upsample8(flow: jnp.ndarray) -> jnp.ndarray:
    """Small model: 8 * bilinear x8 resize, align_corners=True. f32[B,h,w,2] -> [B,8h,8w,2]."""
    _, h, w, _ = flow.shape
    exact = np.float64 if flow.dtype == jnp.float64 else np.float32
    my, mx = (_interp_matrix(n, 8 * n, exact).astype(flow.dtype) for n in (h, w))
    hp = lax.Precision.HIGHEST
    out = jnp.einsum("yh,bhwc->bywc", my, flow, precision=hp)
    return 8.0 * jnp.einsum("xw,bywc->byxc", mx, out, precision=hp)


def _upscaled(config: RaftConfig, image) -> jnp.ndarray:
    """image at the network's input scale (config.input_scale x, bilinear)."""
    b, h, w, _ = image.shape
    s = config.input_scale
    return jax.image.resize(jnp.asarray(image, config.acc_dtype), (b, s * h, s * w, 3), "bilinear")


def _unit(config: RaftConfig, image) -> jnp.ndarray:
    """image in [0, 255] -> [-1, 1], in the accumulation dtype (RAFT's input normalisation)."""
    return 2.0 * (jnp.asarray(image, config.acc_dtype) / 255.0) - 1.0


def _context(config: RaftConfig, variables: dict, x1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The context encoder's (hidden state, input) for x1 in [-1, 1]."""
    _, cnet, _, _ = config.modules()
    cvars = {"params": variables["params"]["cnet"]}
    if "cnet" in variables.get("batch_stats", {}):
        cvars["batch_stats"] = variables["batch_stats"]["cnet"]
    ctx = cnet.apply(cvars, x1).astype(config.acc_dtype)
    return jnp.tanh(ctx[..., : config.hidden_dim]), jax.nn.relu(ctx[..., config.hidden_dim :])


def encode_source(config: RaftConfig, variables: dict, image1) -> dict:
    """What RAFT computes from image1 alone: its feature map and the context encoder's hidden
    state and input. An edit's source is the same in all of its guided evaluations, so the
    sampler can compute this once (raft_forward's `source`) instead of in every evaluation.

    Args:
      image1: f[B,H,W,3] in [0, 255].
    Returns:
      {"fmap": f[B,h,w,C], "net": f32[B,h,w,hidden], "inp": f32[B,h,w,context]} at the input
      scale's 1/8 resolution, each image's on its own (instance norm, per-image "batch" norm).
    """
    check_images(image1, image1)
    if config.input_scale > 1:
        image1 = _upscaled(config, image1)
    fnet = config.modules()[0]
    x1 = _unit(config, image1)
    net, inp = _context(config, variables, x1)
    return {"fmap": fnet.apply({"params": variables["params"]["fnet"]}, x1), "net": net, "inp": inp}


def raft_forward(
    config: RaftConfig,
    variables: dict,
    image1,
    image2,
    iters: int = 12,
    unroll: bool = False,
    sequence: bool = False,
    source: dict | None = None,
):
    """Flow from image1 to image2.

    Args:
      config: the network's static description.
      variables: {"params": ..., "batch_stats": ...} as produced by init_raft / the loaders.
      image1, image2: f[B,H,W,3] in [0, 255], H and W multiples of 8.
      iters: refinement iterations (a Python int).
      unroll: unroll the refinement scan (XLA's cost analysis counts a loop body once, so FLOP
        counts need it; also a speed lever to measure).
      sequence: return every iteration's upsampled flow, f32[iters,B,H,W,2] (for training with
        RAFT's sequence loss).
      source: encode_source(config, variables, image1), computed before; image1 is then only
        checked for its shape (the image1 half of the encoders is skipped). Without it the
        feature encoder runs on both images as one batch, as upstream RAFT does.
    Returns:
      f32[B,H,W,2] flow in pixels, (dx, dy): image1 pixel p matches image2 at p + flow(p).
    """
    check_images(image1, image2)
    s = config.input_scale
    b, h, w, _ = image1.shape
    if source is not None:
        want = (b, s * h // 8, s * w // 8)
        if tuple(source["net"].shape[:3]) != want:
            raise InputError(
                f"the source encoding is for {tuple(source['net'].shape[:3])} (batch, 1/8 "
                f"grid), the images need {want}; encode this source with encode_source"
            )
    if s > 1:
        plain = dataclasses.replace(config, input_scale=1)
        big2 = _upscaled(config, image2)
        big1 = big2 if source is not None else _upscaled(config, image1)  # shape only, if so
        out = raft_forward(plain, variables, big1, big2, iters, unroll, sequence, source)
        pooled = out.reshape(out.shape[:-3] + (h, s, w, s, 2)).mean(axis=(-4, -2))
        return pooled / s
    fnet, _, update, mask_head = config.modules()
    params = variables["params"]
    acc = config.acc_dtype
    x2 = _unit(config, image2)
    if source is None:
        x1 = _unit(config, image1)
        fmaps = fnet.apply({"params": params["fnet"]}, jnp.concatenate([x1, x2], 0))
        fmap1, fmap2 = fmaps[:b], fmaps[b:]
        pyramid = corr_lib.build_pyramid(fmap1, fmap2, config.levels)
        net, inp = _context(config, variables, x1)
    else:
        fmap2 = fnet.apply({"params": params["fnet"]}, x2)
        pyramid = corr_lib.build_pyramid(source["fmap"], fmap2, config.levels)
        net, inp = source["net"], source["inp"]

    b, h, w, _ = net.shape
    coords0 = coords_grid(b, h, w, acc)
    upd_params = {k: v for k, v in params["update_block"].items() if not k.startswith("mask")}

    mask_params = {k: v for k, v in params["update_block"].items() if k.startswith("mask")}

    def upsample(net, coords1):
        if mask_head is None:
            return bilinear_upsample8(coords1 - coords0)
        return convex_upsample(coords1 - coords0, mask_head.apply({"params": mask_params}, net))

    def refine(carry, _):
        net, coords1 = carry
        if config.detach:
            coords1 = lax.stop_gradient(coords1)
        corr = corr_lib.lookup(pyramid, coords1, config.radius)
        net, delta = update.apply({"params": upd_params}, net, inp, corr, coords1 - coords0)
        coords1 = coords1 + delta
        return (net, coords1), (upsample(net, coords1) if sequence else None)

    (net, coords1), flows = lax.scan(refine, (net, coords0), None, length=iters, unroll=unroll)
    return flows if sequence else upsample(net, coords1)


def init_raft(config: RaftConfig, key: jax.Array, size: tuple[int, int] = (128, 128)) -> dict:
    """Random variables for `config` (Flax default initialisers), for tests and training."""
    fnet, cnet, update, mask_head = config.modules()
    h, w = size
    k1, k2, k3, k4 = jax.random.split(key, 4)
    img = jnp.zeros((1, h, w, 3), jnp.float32)
    fv = fnet.init(k1, img)
    cv = cnet.init(k2, img)
    feat = (1, h // 8, w // 8)
    uv = update.init(
        k3,
        jnp.zeros(feat + (config.hidden_dim,)),
        jnp.zeros(feat + (config.context_dim,)),
        jnp.zeros(feat + (config.levels * (2 * config.radius + 1) ** 2,)),
        jnp.zeros(feat + (2,)),
    )
    upd = dict(uv["params"])
    if mask_head is not None:
        upd.update(mask_head.init(k4, jnp.zeros(feat + (config.hidden_dim,)))["params"])
    variables = {"params": {"fnet": fv["params"], "cnet": cv["params"], "update_block": upd}}
    if "batch_stats" in cv:
        variables["batch_stats"] = {"cnet": cv["batch_stats"]}
    return variables


@struct.dataclass
class Raft:
    """A RAFT network: static config plus weights as pytree leaves.

    Pass it into jitted functions as an argument (its weights are then inputs, not constants):
    `jax.jit(lambda net, a, b: net(a, b, iters=5))(net, a, b)`.
    """

    variables: dict
    config: RaftConfig = struct.field(pytree_node=False)

    def __call__(self, image1, image2, iters: int = 12, unroll: bool = False, source=None):
        """f[B,H,W,3] in [0,255] x2 -> f32[B,H,W,2] flow in pixels (source -> target);
        `unroll`: the refinement loop unrolled; `source`: image1's features from
        `encode_source` (raft_forward)."""
        return raft_forward(
            self.config, self.variables, image1, image2, iters, unroll, source=source
        )

    def encode_source(self, image1) -> dict:
        """image1's features, computed once for many image2s (encode_source)."""
        return encode_source(self.config, self.variables, image1)

    def replace_config(self, **changes: Any) -> "Raft":
        """The same weights under another context_norm / dtype."""
        return Raft(self.variables, dataclasses.replace(self.config, **changes))

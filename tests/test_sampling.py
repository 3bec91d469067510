"""bilinear_sample / warp against torch grid_sample(align_corners=True): values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flow.sampling import bilinear_sample, coords_grid, warp

jax.config.update("jax_default_matmul_precision", "highest")

B, H, W, C = 2, 7, 11, 3
PADDINGS = ("zeros", "border", "reflection")
KINDS = ("inside", "outside", "border")
ATOL = 1e-5
RTOL = 1e-5


def _to_pixels(g: np.ndarray, size: int) -> np.ndarray:
    """torch's align_corners=True unnormalisation, in float32."""
    g = g.astype(np.float32)
    return ((g + np.float32(1)) / np.float32(2)) * np.float32(size - 1)


def _grid(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Normalised sampling grid f32[B,N,M,2] (x, y) of the requested kind."""
    if kind == "inside":
        return rng.uniform(-1, 1, size=(B, 5, 6, 2)).astype(np.float32)
    if kind == "outside":
        # Normalised +-5 is 2*(size-1) pixels beyond the far border, -5 as far before the first.
        return rng.uniform(-5, 5, size=(B, 6, 8, 2)).astype(np.float32)
    # Exactly on the border (+-1), on reflection ties (+-3, +-5) and some random partners.
    special = [-1.0, 1.0, -3.0, 3.0, -5.0, 5.0]
    grids = []
    for _ in range(B):
        gx = np.array(special + list(rng.uniform(-1, 1, size=2)), np.float32)
        gy = np.array(special[:4] + list(rng.uniform(-1, 1, size=2)), np.float32)
        mx, my = np.meshgrid(gx, gy, indexing="ij")
        grids.append(np.stack([mx, my], axis=-1))
    return np.stack(grids).astype(np.float32)


def _torch_reference(image, grid, weights, padding):
    """Output, d(loss)/d(image), d(loss)/d(grid) from torch, loss = sum(out * weights)."""
    img = torch.tensor(image.transpose(0, 3, 1, 2), requires_grad=True)
    g = torch.tensor(grid, requires_grad=True)
    out = F.grid_sample(img, g, mode="bilinear", padding_mode=padding, align_corners=True)
    out = out.permute(0, 2, 3, 1)
    (out * torch.from_numpy(weights)).sum().backward()
    return out.detach().numpy(), img.grad.numpy().transpose(0, 2, 3, 1), g.grad.numpy()


@pytest.mark.slow
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_bilinear_sample_matches_grid_sample(padding: str, kind: str) -> None:
    rng = np.random.default_rng(10 * PADDINGS.index(padding) + KINDS.index(kind))
    image = rng.normal(size=(B, H, W, C)).astype(np.float32)
    grid = _grid(kind, rng)
    weights = rng.normal(size=grid.shape[:-1] + (C,)).astype(np.float32)
    x = _to_pixels(grid[..., 0], W)
    y = _to_pixels(grid[..., 1], H)

    def loss(img, xx, yy):
        return jnp.sum(bilinear_sample(img, xx, yy, padding=padding) * weights)

    out = bilinear_sample(jnp.asarray(image), jnp.asarray(x), jnp.asarray(y), padding=padding)
    g_img, g_x, g_y = jax.grad(loss, argnums=(0, 1, 2))(image, x, y)
    ref_out, ref_img, ref_grid = _torch_reference(image, grid, weights, padding)

    assert out.shape == (*grid.shape[:-1], C)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(g_img), ref_img, rtol=RTOL, atol=ATOL)
    # d/dgrid = d/dpixel * (size - 1) / 2.
    np.testing.assert_allclose(
        np.asarray(g_x) * (W - 1) / 2, ref_grid[..., 0], rtol=RTOL, atol=ATOL
    )
    np.testing.assert_allclose(
        np.asarray(g_y) * (H - 1) / 2, ref_grid[..., 1], rtol=RTOL, atol=ATOL
    )


def test_border_coordinate_gradient_is_zero_when_clipped() -> None:
    image = jnp.arange(H * W, dtype=jnp.float32).reshape(1, H, W, 1)
    x = jnp.array([[0.0, W - 1.0, -2.5, W + 3.0]])
    y = jnp.full_like(x, 2.5)
    g_x = jax.grad(lambda xx: bilinear_sample(image, xx, y, padding="border").sum())(x)
    np.testing.assert_array_equal(np.asarray(g_x), 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("scale", [0.8, 12.0])
def test_warp_matches_grid_sample(padding: str, scale: float) -> None:
    rng = np.random.default_rng(7 + int(scale))
    image = rng.normal(size=(B, H, W, C)).astype(np.float32)
    flow = (rng.normal(size=(B, H, W, 2)) * scale).astype(np.float32)
    weights = rng.normal(size=(B, H, W, C)).astype(np.float32)

    def loss(img, fl):
        return jnp.sum(warp(img, fl, padding=padding) * weights)

    out = warp(jnp.asarray(image), jnp.asarray(flow), padding=padding)
    g_img, g_flow = jax.grad(loss, argnums=(0, 1))(image, flow)

    img_t = torch.tensor(image.transpose(0, 3, 1, 2), requires_grad=True)
    flow_t = torch.tensor(flow, requires_grad=True)
    ys, xs = torch.meshgrid(torch.arange(float(H)), torch.arange(float(W)), indexing="ij")
    gx = (xs + flow_t[..., 0]) / (W - 1) * 2 - 1
    gy = (ys + flow_t[..., 1]) / (H - 1) * 2 - 1
    grid_t = torch.stack([gx, gy], dim=-1)
    ref = F.grid_sample(img_t, grid_t, mode="bilinear", padding_mode=padding, align_corners=True)
    ref = ref.permute(0, 2, 3, 1)
    (ref * torch.from_numpy(weights)).sum().backward()

    np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), rtol=1e-4, atol=1e-4)
    ref_img = img_t.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(g_img), ref_img, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g_flow), flow_t.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("padding", PADDINGS)
def test_warp_zero_flow_is_identity(padding: str) -> None:
    image = jnp.asarray(np.random.default_rng(0).normal(size=(B, H, W, C)), jnp.float32)
    out = warp(image, jnp.zeros((B, H, W, 2), jnp.float32), padding=padding)
    np.testing.assert_allclose(np.asarray(out), np.asarray(image), rtol=0, atol=1e-6)


def test_warp_integer_translation_is_a_shift() -> None:
    image = np.random.default_rng(1).normal(size=(B, H, W, C)).astype(np.float32)
    dx, dy = 2, 1
    flow = np.zeros((B, H, W, 2), np.float32)
    flow[..., 0], flow[..., 1] = dx, dy
    out = np.asarray(warp(jnp.asarray(image), jnp.asarray(flow)))
    shifted = np.roll(image, shift=(-dy, -dx), axis=(1, 2))
    np.testing.assert_allclose(
        out[:, : H - dy, : W - dx], shifted[:, : H - dy, : W - dx], atol=1e-6
    )


def test_coords_grid_is_x_then_y() -> None:
    grid = np.asarray(coords_grid(2, 3, 4))
    assert grid.shape == (2, 3, 4, 2)
    assert grid[1, 2, 3, 0] == 3.0 and grid[1, 2, 3, 1] == 2.0


def test_bilinear_sample_accepts_any_point_layout() -> None:
    image = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4, 1)
    out = bilinear_sample(image, jnp.array([1.5, 0.0]), jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(np.asarray(out), [[5.5], [20.0]])


def test_bilinear_sample_rejects_unknown_padding() -> None:
    with pytest.raises(ValueError, match="padding"):
        bilinear_sample(jnp.zeros((1, 2, 2, 1)), jnp.zeros((1, 3)), jnp.zeros((1, 3)), "wrap")

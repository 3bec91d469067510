"""A UNet grown (mgjax.model.grow: deeper, or with text attention at the latent's size) computes
what the smaller one computed, on diffusers' own Flax UNet, and its new layers take gradients,
so that training moves them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import FlaxUNet2DConditionModel
from flax.traverse_util import flatten_dict, unflatten_dict

from mgjax.model import sd as sdm
from tests import tiny_models

# a second layout: two layers per block already, linear projections in the transformers and two
# transformer layers in the second block (as SDXL's blocks have), three resolutions
DEEP_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 32, 64),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 1),
    use_linear_projection=True,
    attention_head_dim=8,
    cross_attention_dim=32,
)


def _unet_eps(config, params):
    model = FlaxUNet2DConditionModel.from_config(dict(config))
    rng = np.random.default_rng(0)
    size = config["sample_size"]
    z = jnp.asarray(rng.standard_normal((3, 4, size, size)), jnp.float32)
    t = jnp.array([5, 400, 990])
    cond = jnp.asarray(rng.standard_normal((3, 7, config["cross_attention_dim"])), jnp.float32)
    return lambda p: model.apply({"params": p}, z, t, cond).sample


def _layouts():
    tiny = tiny_models.tiny(seed=2)
    deep_params = sdm.random_params(
        jax.eval_shape(FlaxUNet2DConditionModel.from_config(DEEP_UNET).init_weights,
                       jax.random.PRNGKey(0)),
        seed=5,
    )  # fmt: skip
    return {"sd1": (dict(tiny.unet.config), tiny.params["unet"]), "deep": (DEEP_UNET, deep_params)}


LAYOUTS = _layouts()


@pytest.mark.parametrize(
    ("layout", "extra"), [("sd1", 1), ("sd1", 2), pytest.param("deep", 1, marks=pytest.mark.slow)]
)
def test_a_deeper_unet_computes_what_the_smaller_one_did(layout, extra):
    config, params = LAYOUTS[layout]
    layers = config["layers_per_block"] + extra
    new_config, grown = sdm.deeper_unet(config, params, layers, seed=3)
    assert new_config["layers_per_block"] == layers
    before = _unet_eps(config, params)(params)
    after = _unet_eps(new_config, grown)(grown)
    assert float(jnp.abs(before).mean()) > 0.1
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=1e-5)
    assert sum(x.size for x in jax.tree.leaves(grown)) > sum(
        x.size for x in jax.tree.leaves(params)
    )


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sd1", "deep"])
def test_the_new_layers_take_gradients_and_change_the_output_once_moved(layout):
    config, params = LAYOUTS[layout]
    layers = config["layers_per_block"] + 1
    new_config, grown = sdm.deeper_unet(config, params, layers, seed=3)
    eps = _unet_eps(new_config, grown)
    grads = flatten_dict(jax.grad(lambda p: jnp.square(eps(p)).mean())(grown))
    flat = flatten_dict(grown)
    new = layers - 1  # the down blocks' new layer index; the up blocks' first new one is 1
    zero_paths = [
        k for k in flat
        if len(k) == 4 and k[-1] == "kernel" and k[2] in ("conv2", "proj_out")
        and k[1] in (f"resnets_{new}", f"attentions_{new}", "resnets_1", "attentions_1")
        and not np.any(np.asarray(flat[k]))
    ]  # fmt: skip
    blocks = {k[0] for k in flat if k[0].startswith(("down_blocks_", "up_blocks_"))}
    assert {k[0] for k in zero_paths} == blocks  # every block grew a layer that starts at zero
    for k in zero_paths:
        assert float(jnp.abs(grads[k]).max()) > 0, k
    moved = dict(flat)
    rng = np.random.default_rng(7)
    for k in zero_paths:
        moved[k] = jnp.asarray(0.05 * rng.standard_normal(flat[k].shape), jnp.float32)
    change = jnp.abs(eps(unflatten_dict(moved)) - eps(grown)).mean()
    assert float(change) > 1e-3


def test_a_unet_is_only_made_deeper():
    config, params = LAYOUTS["deep"]
    same_config, same = sdm.deeper_unet(config, params, 2)
    assert same_config == dict(config)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for layers in (1, 0, 2.5):
        with pytest.raises(ValueError, match="at least 2"):
            sdm.deeper_unet(config, params, layers)


@pytest.mark.parametrize("layout", ["sd1", pytest.param("deep", marks=pytest.mark.slow)])
def test_text_attention_at_the_top_starts_as_the_identity(layout):
    config, params = LAYOUTS[layout]
    new_config, grown = sdm.with_top_attention(config, params, seed=4)
    assert new_config["down_block_types"][0] == "CrossAttnDownBlock2D"
    assert new_config["up_block_types"][-1] == "CrossAttnUpBlock2D"
    assert new_config["only_cross_attention"][0] is True
    assert not any(new_config["only_cross_attention"][1:])
    before = _unet_eps(config, params)(params)
    after = _unet_eps(new_config, grown)(grown)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="top blocks are CrossAttnDownBlock2D"):
        sdm.with_top_attention(new_config, grown)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["sd1", "deep"])
def test_the_new_text_attention_takes_gradients_and_changes_the_output_once_moved(layout):
    config, params = LAYOUTS[layout]
    new_config, grown = sdm.with_top_attention(config, params, seed=4)
    eps = _unet_eps(new_config, grown)
    top = ("down_blocks_0", f"up_blocks_{len(config['up_block_types']) - 1}")
    flat = flatten_dict(grown)
    new = [k for k in flat if k[0] in top and k[1].startswith("attentions_")]
    assert new and all(k not in flatten_dict(params) for k in new)
    outs = [k for k in new if k[2] == "proj_out" and k[-1] == "kernel"]
    assert {k[0] for k in outs} == set(top)
    grads = flatten_dict(jax.grad(lambda p: jnp.square(eps(p)).mean())(grown))
    for k in outs:
        assert float(jnp.abs(grads[k]).max()) > 0, k
    moved = dict(flat)
    for k in outs:
        moved[k] = 0.05 * jnp.asarray(np.random.default_rng(8).standard_normal(flat[k].shape))
    assert float(jnp.abs(eps(unflatten_dict(moved)) - eps(grown)).mean()) > 1e-3

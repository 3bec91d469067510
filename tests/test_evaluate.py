"""python -m mgjax.evaluation.evaluate: flow metrics against a direct RAFT call and numpy, the
drag distance on an analytic flow, and CLIP similarity against transformers' PyTorch CLIP on the
same tiny random weights."""

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from flow import load_raft
from flow.errors import InputError
from mgjax.evaluation import evaluate as ev
from tests.torch_raft import image_pair, random_torchvision_raft


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.save(random_torchvision_raft(small=True, seed=5).state_dict(), root / "raft.pth")
    a, b = image_pair(1, 64, 64, seed=7)
    sample = root / "run" / "sample_00"
    sample.mkdir(parents=True)
    Image.fromarray(np.round(a[0]).astype(np.uint8)).save(sample / "source.png")
    Image.fromarray(np.round(b[0]).astype(np.uint8)).save(sample / "edited.png")
    target = np.zeros((64, 64, 2), np.float32)
    target[16:40, 20:44] = (5.0, -2.0)
    np.save(sample / "target_flow.npy", target)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    Image.fromarray(mask).save(sample / "object_mask.png")
    config = {"raft_weights": str(root / "raft.pth"), "drag": "30,28>35,26"}
    (sample / "config.json").write_text(json.dumps(config))
    return root


@pytest.mark.slow
def test_flow_metrics_match_a_direct_computation(run_dir):
    row = ev.evaluate_sample(str(run_dir / "run" / "sample_00"), None, None, 6)
    raft = load_raft(str(run_dir / "raft.pth"), context_norm="batch")
    src = np.asarray(Image.open(run_dir / "run" / "sample_00" / "source.png"), np.float32)
    edit = np.asarray(Image.open(run_dir / "run" / "sample_00" / "edited.png"), np.float32)
    flow = np.asarray(raft(src[None], edit[None], iters=6))[0].astype(np.float64)
    target = np.load(run_dir / "run" / "sample_00" / "target_flow.npy")
    inside = np.zeros((64, 64), bool)
    inside[16:40, 20:44] = True
    epe = np.sqrt(((flow - target) ** 2).sum(-1))
    np.testing.assert_allclose(row["flow_l1"], np.abs(flow - target).mean(), rtol=1e-5)
    np.testing.assert_allclose(row["flow_epe_inside"], epe[inside].mean(), rtol=1e-5)
    np.testing.assert_allclose(row["flow_epe_outside"], epe[~inside].mean(), rtol=1e-5)
    # drag: the handle (30, 28) carried by RAFT's flow there (bilinear at an integer point)
    want = np.linalg.norm(np.array([30, 28]) + flow[28, 30] - np.array([35, 26]))
    np.testing.assert_allclose(row["drag_distance"], want, rtol=1e-5)
    assert row["clip_similarity"] is None


def test_drag_distance_on_an_analytic_flow():
    ys, xs = np.mgrid[0:20, 0:30].astype(np.float64)
    flow = np.stack([0.5 * xs, 0.25 * ys], -1)  # linear, so bilinear sampling is exact
    handles = np.array([[3.3, 4.7], [10.0, 2.5]])
    targets = np.array([[5.0, 6.0], [15.0, 3.125]])
    tracked = handles + np.stack([0.5 * handles[:, 0], 0.25 * handles[:, 1]], -1)
    want = np.linalg.norm(tracked - targets, axis=-1).mean()
    np.testing.assert_allclose(ev.drag_distance(flow, handles, targets), want, rtol=1e-12)


@pytest.mark.slow
def test_clip_similarity_matches_torch_clip(tmp_path):
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        FlaxCLIPModel,
    )

    config = CLIPConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(3)
    ref = CLIPModel(config).eval()  # the reference; its weights go to Flax through from_pt
    ref.save_pretrained(tmp_path / "pt")
    FlaxCLIPModel.from_pretrained(tmp_path / "pt", from_pt=True).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(tmp_path / "clip")
    clip = ev.Clip(str(tmp_path / "clip"))
    leaves = jax.tree_util.tree_leaves(clip.model.params)
    assert not any(x.committed for x in leaves)  # jit places them, not the host's CPU
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 60, a.shape), 0, 255).astype(np.uint8)
    ours = clip.similarity(a, b)
    pixels = CLIPImageProcessor.from_pretrained(tmp_path / "clip")(
        images=[a, b], return_tensors="pt"
    )
    with torch.no_grad():
        e = ref.get_image_features(**pixels).double()
    e = e / e.norm(dim=-1, keepdim=True)
    want = float(e[0] @ e[1])
    np.testing.assert_allclose(ours, want, rtol=1e-4)
    assert abs(clip.similarity(a, a) - 1.0) < 1e-6 and ours < 1.0 - 1e-4


def test_cli_writes_rows_and_means(run_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    ev.main([str(run_dir / "run"), "--no_clip", "--json", str(out), "--raft_iters", "4"])
    printed = capsys.readouterr().out
    assert "mean of 1" in printed and "flow_l1" in printed
    data = json.loads(out.read_text())
    assert data["mean"]["samples"] == 1
    assert data["mean"]["flow_l1"] == pytest.approx(data["samples"][0]["flow_l1"])
    with pytest.raises(InputError, match="no such run folder"):
        ev.main([str(tmp_path / "nothing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no edits with target_flow.npy"):
        ev.main([str(tmp_path / "empty"), "--no_clip"])
    with pytest.raises(InputError, match="cannot load it"):
        ev.main([str(run_dir / "run"), "--clip_model", str(tmp_path / "no_clip_here")])

"""bench.guidance_terms: each energy term's gradient, split by setting the others' weights to 0."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bench.guidance_terms as GT
import bench.toy_quality as TQ
from flow.checkpoint import load_raft
from mgjax import config as C
from mgjax.edit.motion import auto_frozen_mask
from mgjax.method import numeric as N
from mgjax.method.sampler import Sampler
from mgjax.model import sd as sdm
from mgjax.toy import pack


def test_the_table_reads_norms_frozen_shares_cosines_and_the_clip():
    rng = np.random.default_rng(0)
    flow = rng.normal(size=(2, 4, 3, 3))
    colour = rng.normal(size=(2, 4, 3, 3))
    edited = np.ones((2, 4, 3, 3))
    edited[:, :, 0] = 0.0  # the first latent row frozen
    grads = {"all": flow + colour, "flow": flow, "colour": colour}
    numeric = N.of(C.Method(guidance_weight=2.0, clip=3.0), batch=2)
    rows = GT.term_table(grads, edited, 0.5, numeric)

    def norm(a):
        return np.sqrt((a**2).sum(axis=(1, 2, 3)))

    assert np.isclose(rows["flow"]["norm"], np.median(0.5 * 2.0 * norm(flow)))
    frozen = (flow[:, :, 0] ** 2).sum(axis=(1, 2)) / (flow**2).sum(axis=(1, 2, 3))
    assert np.isclose(rows["flow"]["on_frozen"], frozen.mean())
    whole = flow + colour
    cos = (colour * whole).sum(axis=(1, 2, 3)) / (norm(colour) * norm(whole))
    assert np.isclose(rows["colour"]["cos"], cos.mean())
    assert np.isclose(rows["all"]["cos"], 1.0)
    scale = np.minimum(1.0, 3.0 / (0.5 * 2.0 * norm(whole)))
    assert np.isclose(rows["all"]["clip_scale"], scale.mean())


@pytest.mark.slow
def test_the_terms_gradients_add_up_to_the_whole_energys():
    """Linearity: with the weights as data, the three one-term gradients sum to the gradient of
    the weighted sum (one compiled program for all four)."""
    sd, raft = sdm.load(pack.sd_folder()), load_raft(pack.raft_file())
    preset = dict(TQ.preset_values("toy"), steps=4)
    part = TQ.prepare([TQ.Case(0, 64, TQ.split_seeds("tuning"))], sd, preset, lambda *a: 0.0)
    p = part[0]
    sampler = Sampler(sd, raft, C.Method(**preset), C.Speed(chunk=4))
    inputs = sampler.prepare(
        p["image"][None],
        p["flow"][None],
        sd.embed(p["case"].prompt),
        sd.embed(""),
        frozen=auto_frozen_mask(p["flow"], sd.vae_factor, 3),
        trajectory=p["traj"].latents,
    )
    keys = jax.random.split(jax.random.PRNGKey(0), 1)
    z = inputs.trajectory[1]
    grads = GT.term_gradients(
        sampler.guidance, sd.params, raft, inputs, z, 1, keys, ["all", "flow", "colour", "keep"]
    )
    total = grads["flow"] + grads["colour"] + grads["keep"]
    assert np.abs(grads["all"]).max() > 0
    assert np.abs(total - grads["all"]).max() <= 1e-4 * np.abs(grads["all"]).max()
    assert np.abs(grads["flow"] - grads["colour"]).max() > 1e-3 * np.abs(grads["all"]).max()
    assert jnp.asarray(inputs.numeric.flow_weight)[0] == preset["flow_weight"]  # inputs untouched


BAD_FLAGS = [
    (["--at", "0,400"], "--at 0,400: steps from 0 to 99"),
    (["--at", "x"], "--at x: give DDIM step numbers"),
    (["--set", "dilate=2"], "--set dilate=2: give KEY=VALUE with KEY one of"),
    (["--set", "clip=big"], "--set clip=big: clip takes a number"),
    (["--edits", "0"], "--edits must be at least 1"),
]


def test_a_bad_flag_gets_one_line_from_the_command_line():
    flags, says = BAD_FLAGS[0]
    run = subprocess.run(
        [sys.executable, "-m", "bench.guidance_terms", *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and says in run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""


@pytest.mark.parametrize("flags, says", BAD_FLAGS)
def test_bad_flags_are_refused_before_any_model_work(flags, says, monkeypatch, capsys):
    """The checks themselves, in this process (the command line's exit: the test above); the
    model loaders fail the test if a bad flag reaches them."""

    def no_model(*_):
        raise AssertionError("a model was loaded for a bad flag")

    monkeypatch.setattr(GT.sdm, "load", no_model)
    monkeypatch.setattr(GT, "load_raft", no_model)
    monkeypatch.setattr(sys, "argv", ["guidance_terms", *flags])
    with pytest.raises(SystemExit) as stop:
        GT.main()
    assert isinstance(stop.value.code, str) and says in stop.value.code
    assert capsys.readouterr().out == ""

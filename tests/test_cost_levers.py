"""The cost levers (mgjax.method.cost, docs/cost.md): each at its default, or on where it has
nothing to remove, compiles the paper's program; each, on, does what it claims and nothing else;
`cost.counts` equals the passes the compiled sampler runs, counted as they run.

A seam small enough to compile in a second (tests/test_guidance.py's linear noise model and
upsampling decoder) with an energy without a flow network, wrapped so that every forward and
backward pass of the UNet, the decoder and the energy (the caller of RAFT) is counted while the
compiled program runs (jax.debug.callback in a custom_vjp identity).
"""

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax import config as C
from mgjax.method import cost, ddim
from mgjax.method import guidance as G
from mgjax.method.energy import Energy
from mgjax.method.sampler import Sampler
from tests.test_guidance import Pull, Seam

B, S, H = 2, 8, 64  # images, DDIM steps, image size (latents 4x8x8)
PARAMS = {"w": jnp.float32(0.3), "v": jnp.float32(0.8)}
BASE = dict(steps=S, recursive_steps=2, guidance_weight=50.0, clip=0.24, chunk=S)


class Counter:
    """Images through each network, forward and backward, as the compiled program runs."""

    def __init__(self):
        self.passes = collections.Counter()

    def add(self, name: str, images: int) -> None:
        self.passes[name] += images

    def tap(self, x, name: str):
        """x, counted as `name`_forward when computed and `name`_backward when differentiated."""
        n = x.shape[0]
        forward = functools.partial(self.add, f"{name}_forward", n)
        backward = functools.partial(self.add, f"{name}_backward", n)

        @jax.custom_vjp
        def identity(x):
            jax.debug.callback(forward)
            return x

        def fwd(x):
            jax.debug.callback(forward)
            return x, None

        def bwd(_, ct):
            jax.debug.callback(backward)
            return (ct,)

        identity.defvjp(fwd, bwd)
        return identity(x)

    def per_image(self) -> dict:
        jax.effects_barrier()
        return {k: v // B for k, v in self.passes.items()}


@dataclasses.dataclass(eq=False)
class CountedSeam(Seam):
    counter: Counter = None
    params: dict = dataclasses.field(default_factory=lambda: PARAMS)

    def eps(self, params, z, t, context):
        return self.counter.tap(super().eps(params, z, t, context), "unet")

    def decode(self, params, z):
        return self.counter.tap(super().decode(params, z), "vae")


@dataclasses.dataclass(frozen=True, eq=False)
class CountedPull(Energy):
    """Pull, counted as the energy's flow network would be (MethodEnergy calls RAFT once)."""

    counter: Counter = None
    log_names = ("pull",)

    def __call__(self, x, ctx):
        loss, logs = Pull()(x, ctx)
        return self.counter.tap(loss, "raft"), logs


@pytest.fixture(scope="module")
def scene():
    rng = np.random.default_rng(0)
    frozen = np.zeros((B, 1, 8, 8), bool)
    frozen[..., :2] = True
    return dict(
        source=rng.uniform(size=(B, H, H, 3)),
        flow=np.zeros((B, H, H, 2)),
        cond=rng.standard_normal((1, 3, 5)),
        uncond=np.zeros((1, 3, 5)),
        frozen=frozen,
        trajectory=rng.standard_normal((S, B, 4, 8, 8)),
        z_T=rng.standard_normal((B, 4, 8, 8)).astype(np.float32),
    )


def run(scene, schedule=None, **settings):
    """A whole edit of the scene: (final latent, logs name -> f32[S,K,B], per-image passes,
    the sampler)."""
    counter = Counter()
    sampler = Sampler.of(
        CountedSeam(counter=counter), None, energy=CountedPull(counter), **(BASE | settings)
    )
    inputs = sampler.prepare(
        scene["source"],
        scene["flow"],
        scene["cond"],
        scene["uncond"],
        frozen=scene["frozen"],
        trajectory=scene["trajectory"],
        schedule=schedule,
    )
    state = sampler.init(inputs, scene["z_T"], seeds=[3, 4])
    logs = []
    while int(state.step) < S:
        state, chunk_logs, _ = sampler.advance(inputs, state)
        logs.append(chunk_logs)
    logs = {k: np.concatenate([c[k] for c in logs]) for k in logs[0]}
    sampler.decode(state.z)  # the final decode, counted as cost.counts counts it
    return np.asarray(state.z), logs, counter.per_image(), sampler


def lowered(scene, loops="scan", **settings):
    """The HLO text of a whole edit's chunk (scan) or of one guided evaluation (unrolled)."""
    sampler = Sampler.of(Seam(), None, energy=Pull(), **(BASE | settings | dict(loops=loops)))
    inputs = sampler.prepare(
        scene["source"], scene["flow"], scene["cond"], scene["uncond"],
        frozen=scene["frozen"], trajectory=scene["trajectory"],
    )  # fmt: skip
    state = sampler.init(inputs, scene["z_T"], seeds=[3, 4])
    if loops == "scan":
        return sampler._chunk.lower(
            sampler.guidance, PARAMS, None, inputs, state, length=S, mode="guided"
        ).as_text()
    args = (PARAMS, None, inputs, state.z, jnp.int32(1), jnp.int32(0), state.keys)
    return sampler._evaluation.lower(sampler.guidance, *args, mode="guided").as_text()


# (paper settings, a lever on where it has nothing to remove): the paper's program.
NO_OP = {
    "window and every at their defaults": (
        {},
        dict(guide_from=0.0, guide_until=1.0, guide_every=1),
    ),
    "one phase of the same K": ({}, dict(recursive_phases="2")),
    "phases all of the same K": ({}, dict(recursive_phases="2,2,2")),
    "rescale with nothing removed": ({}, dict(rescale_guidance=True)),
    "reuse with K = 1": (dict(recursive_steps=1), dict(reuse_gradient=True)),
    "cond gradient without CFG": (dict(cfg_scale=1.0), dict(cfg_gradient="cond")),
}


@pytest.mark.parametrize("loops", ["scan", "unrolled"])
def test_levers_with_nothing_to_remove_compile_the_papers_program(scene, loops):
    cases = dict(NO_OP)
    if loops == "unrolled":  # the host loop runs the step's K; each evaluation is the paper's
        cases["unguided steps once"] = ({}, dict(recurse_unguided=False))
    for name, (paper, lever) in cases.items():
        want = lowered(scene, loops, **paper)
        assert lowered(scene, loops, **(paper | lever)) == want, name


@pytest.mark.slow
def test_levers_at_their_defaults_give_the_papers_result_bit_for_bit(scene):
    """The default run (CFG on, a schedule with a 0) and each no-op setting: the same latent,
    the same logs, bit for bit; and recurse_unguided off where every step is guided."""
    schedule = np.array([1.0, 1.0, 0.5, 0.0, 1.0, 2.0, 1.0, 1.0])
    cases = dict(NO_OP, every_step_guided=({}, dict(recurse_unguided=False)))
    papers = {}  # the paper's runs, by settings and schedule
    for name, (paper, lever) in cases.items():
        sched = None if name == "every_step_guided" else schedule
        key = (tuple(sorted(paper.items())), sched is None)
        if key not in papers:
            papers[key] = run(scene, sched, **paper)
            _check_counts(papers[key][2], papers[key][3], sched)
        z, logs, passes, _ = papers[key]
        z_lever, logs_lever, passes_lever, _ = run(scene, sched, **(paper | lever))
        np.testing.assert_array_equal(z_lever, z, err_msg=name)
        for k in logs:
            np.testing.assert_array_equal(logs_lever[k], logs[k], err_msg=f"{name}: {k}")
        assert passes_lever == passes, name


def _check_counts(passes, sampler, schedule=None):
    expected = cost.counts(sampler.method, sampler.speed, schedule)
    counted = {k: passes.get(k, 0) for k in expected if k.endswith(("forward", "backward"))}
    assert counted == {k: expected[k] for k in counted}
    return expected


@pytest.mark.parametrize("loops", [pytest.param("unrolled", marks=pytest.mark.slow), "scan"])
def test_window_and_every_are_the_schedule_zeroed_elsewhere(scene, loops):
    """guide_from 0.25 / guide_until 0.75 / guide_every 2 on 8 steps guide steps 2 and 4: the
    same edit as the schedule 0 at every other step, bit for bit, with 2 x K energy
    evaluations."""
    zeroed = np.array([0, 0, 1, 0, 1, 0, 0, 0], np.float32)
    z_sched, logs_sched, _, _ = run(scene, zeroed, loops=loops)
    lever = dict(guide_from=0.25, guide_until=0.75, guide_every=2, loops=loops)
    z, logs, passes, sampler = run(scene, None, **lever)
    np.testing.assert_array_equal(z, z_sched)
    for k in logs:
        np.testing.assert_array_equal(logs[k], logs_sched[k])
    counts = _check_counts(passes, sampler)
    assert counts["energy_evaluations"] == 2 * 2 and counts["guided_steps"] == 2
    assert counts["unguided_evaluations"] == 6 * 2
    guided = np.isfinite(logs["pull"][:, 0, 0])
    assert guided.tolist() == [False, False, True, False, True, False, False, False]


@pytest.mark.parametrize("loops", [pytest.param("unrolled", marks=pytest.mark.slow), "scan"])
def test_phases_change_k_where_they_say(scene, loops):
    """recursive_phases 2,1: the first half of the steps is the K = 2 edit's, bit for bit; the
    second runs one evaluation per step (its second slot logs NaN)."""
    z2, logs2, _, _ = run(scene, None, loops=loops)
    z, logs, passes, sampler = run(scene, None, recursive_phases="2,1", loops=loops)
    half = S // 2
    for k in logs:
        np.testing.assert_array_equal(logs[k][:half], logs2[k][:half])
    assert np.isnan(logs["noise_norm"][half:, 1]).all()
    assert np.isfinite(logs["noise_norm"][half:, 0]).all()
    assert not np.array_equal(z, z2)
    counts = _check_counts(passes, sampler)
    assert counts["energy_evaluations"] == 2 * half + 1 * half


def test_unguided_steps_once_are_plain_ddim_steps(scene):
    """recurse_unguided off: a step outside the window is one DDIM step with CFG's eps from the
    frozen-copied latent; the guided steps before it are the paper's."""
    z_paper, logs_paper, _, _ = run(scene, None, guide_until=0.5)
    z, logs, passes, sampler = run(scene, None, guide_until=0.5, recurse_unguided=False)
    np.testing.assert_array_equal(logs["pull"][:4], logs_paper["pull"][:4])
    assert np.isnan(logs["noise_norm"][4:, 1]).all()
    counts = _check_counts(passes, sampler)
    assert counts["unguided_evaluations"] == 4  # once per unguided step
    # step 4 by hand from the state after step 3
    inputs, g = _inputs(scene, sampler), sampler.guidance
    state = sampler.init(inputs, scene["z_T"], seeds=[3, 4])
    state, _, _ = sampler.run_chunk(inputs, state, 4)
    sch = ddim.make_schedule(S)
    zt = jnp.where(inputs.frozen, inputs.trajectory[4], state.z)
    eps_u = Seam().eps(PARAMS, zt, None, inputs.uncond)
    eps = eps_u + 7.5 * (Seam().eps(PARAMS, zt, None, inputs.cond) - eps_u)
    want = ddim.step(zt, eps, sch.abar[4], sch.abar_prev[4])
    after, _, _ = sampler.run_chunk(inputs, state, 1)
    np.testing.assert_allclose(after.z, want, rtol=1e-6, atol=1e-6)
    assert g.plan.varying_k


def _inputs(scene, sampler, schedule=None):
    return sampler.prepare(
        scene["source"], scene["flow"], scene["cond"], scene["uncond"],
        frozen=scene["frozen"], trajectory=scene["trajectory"], schedule=schedule,
    )  # fmt: skip


@pytest.mark.parametrize("loops", [pytest.param("unrolled", marks=pytest.mark.slow), "scan"])
def test_reuse_gradient_applies_the_first_guidance_term_k_times(scene, loops):
    """reuse_gradient: one energy evaluation (UNet backward, decoder, RAFT) per step; the first
    evaluation is the paper's, the others apply its guidance term (the same norm) with the UNet
    alone."""
    _, logs_paper, _, _ = run(scene, None, recursive_steps=3, loops=loops)
    z, logs, passes, sampler = run(scene, None, recursive_steps=3, reuse_gradient=True, loops=loops)
    np.testing.assert_array_equal(logs["pull"][0, 0], logs_paper["pull"][0, 0])
    assert np.isnan(logs["pull"][:, 1:]).all() and np.isfinite(logs["pull"][:, 0]).all()
    norms = logs["guidance_norm"]
    np.testing.assert_allclose(norms[:, 1:], np.repeat(norms[:, :1], 2, axis=1), rtol=1e-5)
    counts = _check_counts(passes, sampler)
    assert counts["energy_evaluations"] == S and counts["reused_evaluations"] == 2 * S
    assert counts["unet_forward"] == 2 * 3 * S and counts["unet_backward"] == 2 * S


def test_cond_gradient_halves_the_unet_backward_and_keeps_a_shared_jacobian(scene):
    """cfg_gradient cond: the UNet's backward runs on the conditional half alone; where both
    branches have the same Jacobian (this seam: eps = w z + a function of the prompt) the edit
    is the paper's to rounding."""
    z_paper, logs_paper, passes_paper, _ = run(scene, None)
    z, logs, passes, sampler = run(scene, None, cfg_gradient="cond")
    np.testing.assert_allclose(z, z_paper, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logs["pull"], logs_paper["pull"], rtol=1e-5)
    assert passes["unet_backward"] * 2 == passes_paper["unet_backward"]
    assert passes["unet_forward"] == passes_paper["unet_forward"]
    _check_counts(passes, sampler)


def test_rescale_multiplies_the_guidance_term_by_what_is_removed(scene):
    """rescale_guidance with guide_every 2 and phases 2,1: a guided step's guidance term is
    guide_every x (largest K / its K) times the clipped one, and nothing else changes."""
    lever = dict(guide_every=2, recursive_phases="2,1")
    plain = Sampler.of(Seam(), None, energy=Pull(), **(BASE | lever))
    scaled = Sampler.of(Seam(), None, energy=Pull(), **(BASE | lever | dict(rescale_guidance=True)))
    inputs = _inputs(scene, plain)
    state = plain.init(inputs, scene["z_T"], seeds=[3, 4])
    for i, gain in [(0, 2.0), (6, 4.0)]:
        a, b = (G.evaluate(s.guidance, PARAMS, None, inputs, state.z, i, 0, state.keys)
                for s in (plain, scaled))  # fmt: skip
        np.testing.assert_array_equal(b.guidance, gain * a.guidance)
        np.testing.assert_array_equal(b.eps, a.eps)
        np.testing.assert_array_equal(b.logs["pull"], a.logs["pull"])


def test_counts_of_the_paper_and_the_presets():
    """cost.counts from the settings: the paper's 5000 evaluations, each a CFG UNet forward and
    backward, a decoder and a RAFT pass; fast's and the window's fewer."""
    paper = cost.counts(C.Method())
    assert paper["energy_evaluations"] == 500 * 10 and paper["unguided_evaluations"] == 0
    assert paper["unet_forward"] == paper["unet_backward"] == 2 * 5000
    assert paper["vae_forward"] == 5001 and paper["raft_iterations"] == 5 * 5000
    half = cost.counts(C.make(guide_until=0.5, recurse_unguided=False).method)
    assert half["energy_evaluations"] == 2500 and half["unguided_evaluations"] == 250
    fast = cost.counts(C.resolve(preset="fast", explicit=dict(model="sd")).method)
    assert fast["energy_evaluations"] == 250 * 4


@pytest.mark.parametrize(
    "bad",
    [
        dict(guide_from=0.6, guide_until=0.5),
        dict(guide_until=1.5),
        dict(guide_from=-0.1),
        dict(guide_every=0),
        dict(recursive_phases="4,0"),
        dict(recursive_phases="4,x"),
        dict(steps=2, recursive_phases="1,1,1"),
        dict(cfg_gradient="uncond"),
    ],
)
def test_bad_lever_values_are_refused(bad):
    with pytest.raises(ValueError):
        C.make(**bad)


def test_presets_resolve_to_the_toy_worlds_own_on_the_toy_pack():
    for name in ("fast", "preview"):
        toy = C.resolve(preset=name)
        assert toy == C.make(**C.PRESETS[f"toy_{name}"])
        assert C.resolve(preset=name, explicit=dict(model="sd")) == C.make(
            model="sd", **C.PRESETS[name]
        )
    assert C.resolve(preset="paper").method == C.Method()


def test_the_front_holds_what_no_other_setting_beats():
    from bench.cost_frontier import goodness, pareto

    costs = [1.0, 2.0, 3.0, 4.0, np.nan, 3.0]
    values = [0.5, 0.4, 0.7, 0.7, 0.9, 0.6]
    assert pareto(costs, values).tolist() == [True, False, True, False, False, False]
    # placement error, lower is better; the displacement share, nearer 1 is better
    assert pareto([1.0, 2.0, 3.0], goodness([3.0, 1.0, 2.0], "lower")).tolist() == [
        True,
        True,
        False,
    ]
    assert goodness([1.3, 0.8], "nearer 1").tolist() == pytest.approx([-0.3, -0.2])


def test_the_cheap_picks_lose_least_against_the_best_setting():
    from bench.cost_frontier import picks

    def row(name, tflop, share, iou):
        return dict(name=name, tflop_per_edit=tflop,
                    quality=dict(displacement_share=share, iou=iou))  # fmt: skip

    rows = [
        row("best", 1000.0, 0.9, 0.8),
        row("overshoots", 2000.0, 1.3, 0.7),  # share capped at 1: 1.7 < 1.7 + 0 is no better
        row("quarter, share lost", 240.0, 0.72, 0.8),  # losses 20%, 0%
        row("quarter, both lost a little", 250.0, 0.81, 0.76),  # 10%, 5%
        row("a third", 300.0, 0.9, 0.8),  # as good, but not 4x cheaper
        row("tenth", 100.0, 0.45, 0.6),
        row("no flops", None, 1.0, 1.0),
    ]
    chosen = picks(rows)
    assert chosen["reference"] == "best"
    assert chosen[4]["name"] == "quarter, both lost a little"
    assert chosen[4]["factor"] == pytest.approx(4.0)
    assert chosen[4]["share_loss"] == pytest.approx(0.1)
    assert chosen[4]["iou_loss"] == pytest.approx(0.05)
    assert chosen[10]["name"] == "tenth" and chosen[10]["share_loss"] == pytest.approx(0.5)
    assert picks(rows, factors=(20,))[20] is None
    assert picks([row("no flops", None, 1.0, 1.0)]) == {"reference": None}
    # a reference that achieves no displacement: the cheap settings are told apart by IoU
    still = picks([row("ref", 1000.0, 0.0, 0.95), row("a", 200.0, 0.0, 0.6),
                   row("b", 250.0, -0.2, 0.8)])  # fmt: skip
    assert still["reference"] == "ref"
    assert still[4]["name"] == "b" and np.isnan(still[4]["share_loss"])


def test_paired_differences_are_edit_by_edit():
    from bench.cost_frontier import paired

    def row(name, values):
        return dict(name=name, rows=[dict(edit=e, iou=v) for e, v in enumerate(values)])

    rows = [row("ref", [0.5, 0.6, 0.7]), row("other", [0.6, 0.6, 0.9])]
    text = paired(rows, "ref", measures=("iou",))
    se = np.std([0.1, 0.0, 0.2], ddof=1) / np.sqrt(3)
    assert f"| other | +0.100 +- {se:.3f} |" in text
    assert "| ref | +0.000 +- 0.000 |" in text


def test_preset_costs_are_their_counts_times_each_evaluations_flops():
    import json

    from bench.cost_frontier import (
        PRESET_NAMES,
        edit_flops,
        flops_key,
        preset_costs,
        preset_table,
    )

    per = dict(energy=8e12, unet_only=1.5e12, decode=2.5e12)
    cache = {}
    for name in PRESET_NAMES:  # one FLOP count per evaluation kind the presets use
        key = flops_key(C.make(**C.PRESETS[name]).method, "sd")
        cache[json.dumps(key, sort_keys=True)] = per
    costs = {c["name"]: c for c in preset_costs("sd", cache, None, None)}  # nothing to compile
    assert costs["paper"]["tflop_per_edit"] == pytest.approx((5000 * 8e12 + 2.5e12) / 1e12)
    assert costs["fast"]["tflop_per_edit"] == pytest.approx((1000 * 8e12 + 2.5e12) / 1e12)
    # an edit guided every 2nd of 4 steps: 2 energy evaluations and 2 UNet-only ones
    every = C.make(steps=4, recursive_steps=1, guide_every=2, recurse_unguided=False).method
    counts = cost.counts(every, cfg=True)
    assert (counts["energy_evaluations"], counts["unguided_evaluations"]) == (2, 2)
    assert edit_flops(counts, per) == pytest.approx(2 * 8e12 + 2 * 1.5e12 + 2.5e12)
    for name in ("toy_fast", "toy_preview"):
        steps = C.make(**C.PRESETS[name]).method.steps
        assert costs[name]["tflop_per_edit"] == pytest.approx((steps * 8e12 + 2.5e12) / 1e12)
    assert "| paper | 5000 | 0 | 4e+04 | 1.0 |" in preset_table(list(costs.values()))


def test_every_frontier_setting_is_a_method_and_every_lever_is_measured():
    from bench.cost_frontier import SETTINGS, method_of

    changed = set()
    for settings in SETTINGS.values():
        method = C.make(**method_of("toy", settings)).method
        changed |= set(settings)
        if "steps_share" in settings:
            assert method.steps == round(
                C.make(**C.PRESETS["toy"]).method.steps * settings["steps_share"]
            )
    levers = {
        "guide_from", "guide_until", "guide_every", "recursive_phases", "recurse_unguided",
        "rescale_guidance", "reuse_gradient", "cfg_gradient", "raft_iters", "steps_share",
    }  # fmt: skip
    assert levers <= changed, levers - changed


def test_levers_together_scan_and_unrolled_run_the_same_evaluations(scene):
    """Every lever on at once, a chunk mixing guided and unguided steps: the scan (a lax.cond
    per evaluation slot) and the host loop run the same evaluations, counted as cost.counts
    says, to the same edit."""
    lever = dict(
        recursive_phases="3,1",
        reuse_gradient=True,
        guide_from=0.125,
        guide_every=2,
        recurse_unguided=False,
        rescale_guidance=True,
        cfg_gradient="cond",
    )
    results = {loops: run(scene, None, loops=loops, **lever) for loops in ("scan", "unrolled")}
    (z_s, logs_s, passes_s, sampler), (z_u, logs_u, passes_u, _) = results.values()
    assert passes_s == passes_u
    counts = _check_counts(passes_s, sampler)
    assert counts["energy_evaluations"] == 4 and counts["reused_evaluations"] == 2 * 2
    for k in logs_s:
        np.testing.assert_array_equal(np.isnan(logs_s[k]), np.isnan(logs_u[k]), err_msg=k)
    np.testing.assert_allclose(z_s, z_u, rtol=1e-4, atol=1e-5)

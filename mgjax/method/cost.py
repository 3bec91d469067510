"""What the cost levers make of a method, step by step, and what an edit then costs.

`Plan` is host-side and static (numpy, from `mgjax.config.Method` alone): per DDIM step, the
K of its phase (`recursive_phases`), whether the guidance window and `guide_every` let guidance
act there, and the factor `rescale_guidance` puts on the guidance term. The guided sampler
(mgjax.method.guidance) reads it while tracing; at the defaults every lever is off and none of
its code is traced, so the compiled program is the paper's.

`counts` adds up, from the same plan, the evaluations of one edit and the forward and backward
passes of the UNet, the VAE decoder and RAFT (docs/cost.md); a test checks it against the
passes the compiled sampler really runs.
"""

import dataclasses
import math

import numpy as np

from mgjax.config import Method, Speed, parse_phases


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """The static per-step view of a method's cost levers (S = method.steps)."""

    phase_k: np.ndarray  # i32[S] K of the step's phase (recursive_steps without phases)
    window: np.ndarray  # bool[S] guidance may act (guide_from <= i/S < guide_until, guide_every)
    gain: np.ndarray  # f32[S] factor on the clipped guidance term (1 unless rescale_guidance)
    recurse_unguided: bool  # steps with weight 0 run phase_k evaluations (else one)
    reuse_gradient: bool  # one energy evaluation per step, its guidance term applied K times
    # (off where every K is 1)

    @property
    def k_max(self) -> int:
        """The evaluation slots per step: the largest K (logs are f32[L, k_max, B])."""
        return int(self.phase_k.max())

    @property
    def windowed(self) -> bool:
        """Some step is outside the window: the weight is masked per step."""
        return not bool(self.window.all())

    @property
    def rescaled(self) -> bool:
        return bool((self.gain != 1.0).any())

    @property
    def varying_k(self) -> bool:
        """Some step may run fewer than k_max evaluations (phases, or unguided steps once)."""
        return bool((self.phase_k != self.k_max).any()) or not self.recurse_unguided

    def step_k(self, weighted: np.ndarray, start: int = 0) -> np.ndarray:
        """i32[L]: evaluations of steps start.. given which have a non-zero weight."""
        k = self.phase_k[start : start + len(weighted)]
        return k if self.recurse_unguided else np.where(weighted, k, 1)


def phase_k(method: Method) -> np.ndarray:
    """i32[S]: K per step; recursive_phases splits the steps into equal parts, noisiest first
    (part p covers steps floor(p S / P) .. floor((p + 1) S / P) - 1)."""
    s, phases = method.steps, parse_phases(method.recursive_phases)
    if not phases:
        return np.full(s, method.recursive_steps, np.int32)
    part = (np.arange(s) * len(phases)) // s
    return np.asarray(phases, np.int32)[part]


def window(method: Method) -> np.ndarray:
    """bool[S]: the steps guidance may act on: from round(guide_from S) to before
    round(guide_until S), every guide_every-th from the first."""
    s = method.steps
    lo, hi = (math.floor(f * s + 0.5) for f in (method.guide_from, method.guide_until))
    i = np.arange(s)
    return (i >= lo) & (i < hi) & ((i - lo) % method.guide_every == 0)


def plan(method: Method) -> Plan:
    """The plan of `method`. rescale_guidance: the guidance term of a guided step times
    guide_every x (k_max / the step's K), the pushes of the evaluations the levers remove."""
    k = phase_k(method)
    gain = np.ones(method.steps, np.float32)
    if method.rescale_guidance:
        gain = (method.guide_every * k.max() / k).astype(np.float32)
    reuse = method.reuse_gradient and k.max() > 1  # with K = 1 there is nothing to reuse
    return Plan(k, window(method), gain, method.recurse_unguided, bool(reuse))


def weighted_steps(method: Method, schedule=None, weight: float | None = None) -> np.ndarray:
    """bool[S]: steps whose guidance weight x schedule x window is not 0, for one edit."""
    weight = method.guidance_weight if weight is None else weight
    sched = np.ones(method.steps) if schedule is None else np.asarray(schedule, np.float64)
    return (sched * window(method) * weight) != 0


def counts(
    method: Method,
    speed: Speed = Speed(),
    schedule=None,
    cfg: bool | None = None,
) -> dict[str, int]:
    """Evaluations and network passes of one edit's guided sampling (batch 1), the final
    decode included, from the settings alone. A pass is one image through a network: a UNet
    call on the CFG batch [uncond, cond] is 2 passes, its backward 2 more.

    Args:
      schedule: f32[S] guidance multipliers (None: all ones).
      cfg: whether the unconditional branch runs (default: cfg_scale != 1).
    Returns:
      energy_evaluations (the energy and its gradient), reused_evaluations (a step's earlier
      guidance term applied again), unguided_evaluations (the UNet alone), guided_steps, and
      unet_/vae_/raft_ forward/backward passes, raft_iterations (forward).
    """
    p = plan(method)
    cfg = method.cfg_scale != 1.0 if cfg is None else cfg
    weighted = weighted_steps(method, schedule)
    evaluated = weighted if speed.skip_unguided else np.ones_like(weighted)
    k = p.step_k(weighted)
    energy = np.where(evaluated, 1 if p.reuse_gradient else k, 0)
    reused = np.where(evaluated, k - energy, 0)
    unguided = np.where(evaluated, 0, k)
    n_e, n_r, n_u = int(energy.sum()), int(reused.sum()), int(unguided.sum())
    branches = 2 if cfg else 1
    grad_branches = 1 if method.cfg_gradient == "cond" else branches
    return dict(
        energy_evaluations=n_e,
        reused_evaluations=n_r,
        unguided_evaluations=n_u,
        guided_steps=int(weighted.sum()),
        unet_forward=branches * (n_e + n_r + n_u),
        unet_backward=grad_branches * n_e,
        vae_forward=n_e + 1,  # the final decode
        vae_backward=n_e,
        raft_forward=n_e,
        raft_backward=n_e,
        raft_iterations=n_e * method.raft_iters,
    )


def evaluations_per_step(method: Method, speed: Speed = Speed(), schedule=None) -> float:
    """The mean evaluations a DDIM step runs (K without the levers): progress shows
    evaluations/s as steps/s times this."""
    c = counts(method, speed, schedule)
    total = c["energy_evaluations"] + c["reused_evaluations"] + c["unguided_evaluations"]
    return total / method.steps

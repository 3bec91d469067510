"""Guidance energies. The paper's (Geng & Owens, Sec. 3) is flow L1 + occlusion-masked colour L1;
the sampler takes any `Energy`: a pure function of the decoded one-step estimate and a `Context`.

Writing one (it runs inside the jitted sampler: jnp only, no Python side effects)::

    import dataclasses
    import jax.numpy as jnp
    from mgjax.method.energy import Energy, MotionEnergy

    @dataclasses.dataclass(frozen=True)       # hashable: part of the compiled chunk
    class Brightness(Energy):
        target: float = 0.6
        log_names = ("brightness_loss",)

        def __call__(self, x, ctx):           # x: f32[B,H,W,3] in [0, 1], ctx: Context
            loss = jnp.abs(x.mean(axis=(1, 2, 3)) - self.target)   # f32[B]
            return loss, {"brightness_loss": loss}

    energy = MotionEnergy() + 50.0 * Brightness()  # weighted sums compose
    sampler = Sampler(sd, raft, method, energy=energy)

Per-edit arrays an energy needs (a reference image, a region mask) go in
`mgjax.method.inputs.prepare(..., extras={"name": array [B, ...]})` and arrive as
`ctx.extras["name"]`; they are arguments of the compiled chunk, so new values never retrace it.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import ClassVar, NamedTuple

import jax.numpy as jnp

from flow.errors import InputError
from flow.raft import Raft
from flow.sampling import warp
from mgjax.config import Method


class EnergyWeights(NamedTuple):
    flow: float = Method.flow_weight  # lambda_flow
    color: float = Method.color_weight  # lambda_color


PAPER_WEIGHTS = EnergyWeights()


def occlusion_mask(target_flow: jnp.ndarray) -> jnp.ndarray:
    """1 = use in the colour loss, 0 = background that the moving object will cover.

    A pixel gets 0 exactly when its target flow is zero and some moving pixel p lands on it:
    it is a bilinear neighbour, with non-zero weight, of p + f(p). Moving pixels keep 1.

    Args:
      target_flow: f32[B,H,W,2] in pixels (dx, dy), defined on the source frame.
    Returns:
      f32[B,H,W,1].
    """
    b, h, w, _ = target_flow.shape
    moving = jnp.any(target_flow != 0, axis=-1)  # bool[B,H,W]
    ys, xs = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    tx, ty = xs + target_flow[..., 0], ys + target_flow[..., 1]
    x0, y0 = jnp.floor(tx), jnp.floor(ty)
    fx, fy = tx - x0, ty - y0
    covered = jnp.zeros((b, h * w), bool)
    batch = jnp.broadcast_to(jnp.arange(b)[:, None, None], (b, h, w))
    for dx, dy, weight in (
        (0, 0, (1 - fx) * (1 - fy)),
        (1, 0, fx * (1 - fy)),
        (0, 1, (1 - fx) * fy),
        (1, 1, fx * fy),
    ):
        cx, cy = x0 + dx, y0 + dy
        hit = moving & (weight > 0) & (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        idx = jnp.clip(cy, 0, h - 1).astype(jnp.int32) * w + jnp.clip(cx, 0, w - 1).astype(
            jnp.int32
        )
        covered = covered.at[batch, idx].max(hit)
    covered = covered.reshape(b, h, w)
    return jnp.where(covered & ~moving, 0.0, 1.0)[..., None]


def motion_energy(
    edit: jnp.ndarray,
    source: jnp.ndarray,
    target_flow: jnp.ndarray,
    mask: jnp.ndarray,
    raft: Raft,
    weights: EnergyWeights = PAPER_WEIGHTS,
    raft_iters: int = Method.raft_iters,
    oracle: bool = Method.oracle,
) -> tuple[jnp.ndarray, dict]:
    """E = lambda_flow * L_flow + lambda_color * L_color for one batch of edits.

    Args:
      edit: f32[B,H,W,3] decoded one-step estimate, in [0, 1] (not clamped).
      source: f32[B,H,W,3] source image x*, in [0, 1].
      target_flow: f32[B,H,W,2] target flow f.
      mask: f32[B,H,W,1] occlusion mask (occlusion_mask(f), or ones to switch masking off).
      raft: RAFT called as RAFT(source, edit) on [0, 255] images.
      oracle: warp with the target flow instead of RAFT's flow in the colour loss.
    Returns:
      (E summed over the batch, {"energy", "flow_loss", "color_loss"} per image, f32[B]).
    """
    flow = raft(255.0 * source, 255.0 * edit, iters=raft_iters)
    flow_loss = jnp.abs(flow - target_flow).mean(axis=(1, 2, 3))  # per-component L1 mean
    warped = warp(edit, target_flow if oracle else flow, padding="reflection")
    color_loss = jnp.abs(mask * source - mask * warped).mean(axis=(1, 2, 3))  # masked in mean
    energy = weights.flow * flow_loss + weights.color * color_loss
    return energy.sum(), {"energy": energy, "flow_loss": flow_loss, "color_loss": color_loss}


# ----------------------------------------------------------------------------- pluggable energies


@dataclasses.dataclass(frozen=True)
class Context:
    """What an energy sees besides the decoded estimate. Arrays are batch-first (B edits)."""

    source: jnp.ndarray  # f32[B,H,W,3] source image, in [0, 1]
    target_flow: jnp.ndarray  # f32[B,H,W,2] in pixels
    occlusion: jnp.ndarray  # f32[B,H,W,1] 1 = used by the colour loss
    # flow(image1, image2, iters) -> f32[B,H,W,2]: the sampler's RAFT on [0, 255] images, under
    # its dtype and remat settings
    flow: Callable
    extras: Mapping[str, jnp.ndarray] = dataclasses.field(default_factory=dict)
    # source_flow(image2, iters) -> f32[B,H,W,2]: flow(255 * source, image2, iters), with the
    # source's RAFT encoding computed once per edit (the sampler's); None: through `flow`
    source_flow: Callable | None = None
    # the method's numbers per image (mgjax.method.numeric.Numeric, f32[B] leaves): MethodEnergy's
    # weights; None where no sampler made the context
    numeric: object = None

    def flow_from_source(self, image2, iters: int) -> jnp.ndarray:
        """RAFT(255 * source, image2) for image2 in [0, 255]."""
        if self.source_flow is None:
            return self.flow(255.0 * self.source, image2, iters)
        return self.source_flow(image2, iters)


class Energy:
    """Base of guidance energies: `energy(x, ctx) -> (f32[B], {name: f32[B]})`, per image, with
    the logged terms named in `log_names`. Subclasses are frozen dataclasses (hashable).
    `w * energy` and `energy + other` build a `WeightedSum`."""

    log_names: ClassVar[tuple[str, ...]] = ()

    def __call__(self, x, ctx: Context):
        raise NotImplementedError

    def terms(self) -> tuple[tuple[float, "Energy"], ...]:
        return ((1.0, self),)

    def __mul__(self, weight: float) -> "WeightedSum":
        return WeightedSum(tuple((weight * w, e) for w, e in self.terms()))

    __rmul__ = __mul__

    def __add__(self, other: "Energy") -> "WeightedSum":
        if not isinstance(other, Energy):
            return NotImplemented
        return WeightedSum(self.terms() + other.terms())


@dataclasses.dataclass(frozen=True)
class WeightedSum(Energy):
    """sum_k w_k E_k; logs the union of the terms' logs (their names must differ)."""

    parts: tuple[tuple[float, Energy], ...]

    def __post_init__(self):
        names = [n for _, e in self.parts for n in e.log_names]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise InputError(f"energy terms log the same names {clash}; give each term its own")
        if "energy" in names:
            raise InputError("an energy term may not log 'energy' (the sampler logs the total)")

    @property
    def log_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(n for _, e in self.parts for n in e.log_names)

    def terms(self):
        return self.parts

    def __call__(self, x, ctx: Context):
        total, logs = 0.0, {}
        for w, e in self.parts:
            value, part = e(x, ctx)
            total = total + w * value
            logs.update(part)
        return total, logs


@dataclasses.dataclass(frozen=True)
class MotionEnergy(Energy):
    """The paper's energy: lambda_flow * L1(RAFT(source, x), f) + lambda_color * masked colour L1
    of x warped back by RAFT's flow (or by f with `oracle`)."""

    flow_weight: float = Method.flow_weight
    color_weight: float = Method.color_weight
    raft_iters: int = Method.raft_iters
    oracle: bool = Method.oracle
    log_names: ClassVar[tuple[str, ...]] = ("flow_loss", "color_loss")

    def __call__(self, x, ctx: Context):
        logs = _motion_logs(x, ctx, EnergyWeights(self.flow_weight, self.color_weight),
                            self.raft_iters, self.oracle)  # fmt: skip
        return logs["energy"], {k: logs[k] for k in self.log_names}


def _motion_logs(x, ctx: Context, weights: EnergyWeights, raft_iters: int, oracle: bool) -> dict:
    """motion_energy's logs for the estimate x against the context's source, target flow and
    occlusion, RAFT called through the context (its source encoding reused)."""
    _, logs = motion_energy(
        x,
        ctx.source,
        ctx.target_flow,
        ctx.occlusion,
        lambda _, b, iters: ctx.flow_from_source(b, iters),  # the first image is the source
        weights,
        raft_iters,
        oracle,
    )
    return logs


def still_region(target_flow: jnp.ndarray, occlusion: jnp.ndarray) -> jnp.ndarray:
    """f32[B,H,W,1]: 1 where nothing should change (zero target flow, not covered by the moving
    object), 0 on the object, where it goes and where it uncovers."""
    still = jnp.all(target_flow == 0, axis=-1, keepdims=True)
    return (still & (occlusion > 0)).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class PreservationEnergy(Energy):
    """Mean L1 between the estimate and the source over the region that should not change
    (`still_region`, or `ctx.extras["keep"]` f32[B,H,W,1] when given). A second built-in: no
    flow network, so it pulls the background back to the source directly."""

    log_names: ClassVar[tuple[str, ...]] = ("keep_loss",)

    def __call__(self, x, ctx: Context):
        keep = ctx.extras.get("keep")
        if keep is None:
            keep = still_region(ctx.target_flow, ctx.occlusion)
        loss = jnp.abs(keep * (x - ctx.source)).mean(axis=(1, 2, 3))
        return loss, {"keep_loss": loss}


@dataclasses.dataclass(frozen=True)
class MethodEnergy(Energy):
    """The energy a method's settings describe, its weights read per image from `ctx.numeric`
    (mgjax.method.numeric.Numeric): lambda_flow L_flow + lambda_color L_color as MotionEnergy, plus
    preserve_weight x PreservationEnergy's loss when `preserve`.

    The weights are data (new values reuse the compiled program, a batch may mix them); what
    is computed is static: RAFT's iterations, the oracle warp, and whether the preservation
    term exists at all (`preserve`; its weight may then be 0 for some images)."""

    raft_iters: int = Method.raft_iters
    oracle: bool = Method.oracle
    preserve: bool = False

    @property
    def log_names(self) -> tuple[str, ...]:  # type: ignore[override]
        motion = MotionEnergy.log_names
        return (*motion, *PreservationEnergy.log_names) if self.preserve else motion

    def __call__(self, x, ctx: Context):
        num = ctx.numeric
        if num is None:
            raise InputError("MethodEnergy reads its weights from ctx.numeric; none was given")
        logs = _motion_logs(x, ctx, EnergyWeights(num.flow_weight, num.color_weight),
                            self.raft_iters, self.oracle)  # fmt: skip
        energy, out = logs["energy"], {k: logs[k] for k in MotionEnergy.log_names}
        if self.preserve:
            keep, part = PreservationEnergy()(x, ctx)
            energy = energy + num.preserve_weight * keep
            out.update(part)
        return energy, out


def method_energy(method: Method) -> Energy:
    """The energy a method's settings describe (MethodEnergy): the paper's, plus
    preserve_weight x PreservationEnergy when that weight is positive; the weights are the
    sampler's per-image numbers (inputs.numeric), the form is the method's."""
    return MethodEnergy(method.raft_iters, method.oracle, method.preserve_weight > 0)

"""The driver around mgjax.method.guidance's pure functions: what is not maths.

`Sampler` compiles ahead of time and caches per chunk length and kind, chooses between the scan
chunk and unrolled evaluations (`Speed.loops`), counts traces (a retrace tripwire), checks each
chunk for NaN/inf and decodes the final latents. The method's numbers are data of the compiled
programs (`inputs.numeric`, mgjax.method.numeric): one Sampler serves every guidance weight, CFG
scale, clip, eta and energy weight of its method's structure, batches mixing them included.
With loops "unrolled" (the default on CPU) the evaluations of a chunk run one compiled call
each, in the scan's order with the scan's noise; the weights are always jit arguments and the
carried latent is donated.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flow.errors import InputError
from mgjax import config as C
from mgjax.config import Method, Speed
from mgjax.method import guidance as G
from mgjax.method import numeric as N
from mgjax.method.energy import Energy, method_energy
from mgjax.method.inputs import GuidanceInputs, prepare


class DivergenceError(RuntimeError):
    """The latents or the energy became NaN/inf; `bad` lists the batch images affected."""

    def __init__(self, message: str, bad: tuple[int, ...] = ()):
        super().__init__(message)
        self.bad = tuple(bad)


def _evaluate_and_step(g, params, raft, inputs, z, i, j, keys, given=None, mode="guided"):
    """What the driver keeps of an evaluation: (z_prev, z_next, logs, x0), and with
    reuse_gradient the guidance term (the step's other evaluations apply it). Leaving the rest
    out of the compiled program's outputs lets XLA fuse it as it fuses the scan's body."""
    ev = G.evaluate(g, params, raft, inputs, z, i, j, keys, mode, given)
    if g.plan.reuse_gradient:  # static
        return ev.z_prev, ev.z_next, ev.logs, ev.x0, ev.guidance
    return ev.z_prev, ev.z_next, ev.logs, ev.x0


class Sampler:
    """Motion-guided DDIM over a Stable Diffusion seam (`mgjax.model.sd`) and a RAFT network.

    `energy` defaults to what `method` describes (mgjax.method.energy.method_energy); with another
    energy the method's flow/colour weights, raft_iters, oracle and preserve_weight are unused.
    `snapshot_every` > 0 keeps the decoded one-step estimate every that many steps. `method`'s
    numbers are the default of `prepare`; inputs with other numbers (`prepare(numeric=...)`)
    run on the same compiled programs, except that the first batch with some cfg_scale != 1
    (or eta > 0) compiles the program with that switch on (mgjax.method.numeric.Switches).
    """

    def __init__(
        self,
        sd,
        raft,
        method: Method = Method(),
        speed: Speed = Speed(),
        energy: Energy | None = None,
        snapshot_every: int = 0,
    ):
        self.sd, self.raft = sd, raft
        energy = method_energy(method) if energy is None else energy
        self.guidance = G.Guidance(sd, energy, method, speed, snapshot_every)
        self._guidances = {self.guidance.switches: self.guidance}
        self.method, self.speed, self.energy = method, speed, energy
        self.log_names = self.guidance.log_names
        self.loops = self.guidance.loops  # "scan" or "unrolled"
        self.dtype = self.guidance.dtype
        self.traces = 0  # how many times a chunk or an evaluation was traced
        self.compile_seconds = 0.0  # time spent tracing + compiling
        self._compiled: dict = {}
        # the carried state (scan) or latent (unrolled) is donated: its buffers are reused
        self._chunk = jax.jit(
            self._counted(G.step_chunk),
            static_argnums=0,
            static_argnames=("length", "mode"),
            donate_argnames=("state",),
        )
        self._evaluation = jax.jit(
            self._counted(_evaluate_and_step),
            static_argnums=0,
            static_argnames=("mode",),
            donate_argnums=4,
        )
        self._final = jax.jit(self._final_energy)
        self._encode = jax.jit(lambda raft, image: raft.encode_source(image))
        self._decode = jax.jit(G.final_image, static_argnums=0)

    @classmethod
    def of(cls, sd, raft, energy: Energy | None = None, snapshot_every: int = 0, **settings):
        """A Sampler with the default method and speed changed by flat-named settings
        (mgjax.config: steps=4, recursive_steps=2, chunk=2, loops="scan", ...)."""
        config = C.make(**settings)
        return cls(sd, raft, config.method, config.speed, energy, snapshot_every)

    def _counted(self, fn):
        @functools.wraps(fn)  # jit reads the argument names through __wrapped__
        def traced(*args, **kwargs):
            self.traces += 1
            return fn(*args, **kwargs)

        return traced

    # ------------------------------------------------------------------ inputs

    def prepare(self, source, target_flow, cond, uncond, encode: bool = True, **arrays):
        """mgjax.method.inputs.prepare for this model and method (see there for the arrays, and
        `numeric`: the method's numbers per image, default this method's); encode: with
        speed.source_cache, RAFT-encode the source now (batch editing does it once the inputs
        are sharded instead)."""
        inputs = prepare(
            self.sd, self.method, source, target_flow, cond, uncond, dtype=self.dtype, **arrays
        )
        return self.encode_source(inputs) if encode else inputs

    def encode_source(self, inputs: GuidanceInputs) -> GuidanceInputs:
        """With speed.source_cache, `inputs` with RAFT's encoding of its source images, computed
        where the source lies (after sharding, each device encodes its own). Otherwise as is."""
        if not self.speed.source_cache:
            return inputs
        return inputs.replace(raft_source=self._encode(self.raft, 255.0 * inputs.source))

    def init(self, inputs: GuidanceInputs, z_T, seeds, step: int = 0) -> G.SamplerState:
        """mgjax.method.guidance.init."""
        return G.init(inputs, z_T, seeds, step)

    # ------------------------------------------------------------------ running

    def guidance_for(self, inputs: GuidanceInputs) -> G.Guidance:
        """The static description for these inputs: this sampler's, with the switches their
        numbers need (one Guidance per combination, so each compiles once). Host-side."""
        switches = N.Switches.of(G.numbers(self.guidance, inputs))
        if switches not in self._guidances:
            every = self.guidance.snapshot_every
            self._guidances[switches] = G.Guidance(
                self.sd, self.energy, self.method, self.speed, every, switches
            )
        return self._guidances[switches]

    def guided_steps(self, inputs: GuidanceInputs, start: int, length: int) -> np.ndarray:
        return G.guided_steps(self.guidance, inputs, start, length)

    def compiled(self, jitted, args, guidance: G.Guidance | None = None, **static):
        """`jitted` compiled ahead of time for these arguments' shapes and the static ones,
        cached; its compile time is added to compile_seconds. guidance: the static description
        (default: for the inputs among args, `guidance_for`)."""
        if guidance is None:
            inputs = next(a for a in args if isinstance(a, GuidanceInputs))
            guidance = self.guidance_for(inputs)
        leaves, treedef = jax.tree_util.tree_flatten(args)
        avals = tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)
        key = (jitted, guidance.switches, tuple(sorted(static.items())), treedef, avals)
        fn = self._compiled.get(key)
        if fn is None:
            t = time.perf_counter()
            fn = jitted.lower(guidance, *args, **static).compile()
            self.compile_seconds += time.perf_counter() - t
            self._compiled[key] = fn
        return fn

    @property
    def programs(self) -> list:
        """Every program compiled so far (XLA's cost and memory analyses are on them)."""
        return list(self._compiled.values())

    def compiled_chunk(self, inputs, state, length: int, mode: str | None = None):
        """The scan chunk of `length` steps from state.step, compiled (XLA's cost and memory
        analyses are on it); mode: as mgjax.method.guidance.chunk_mode says by default."""
        mode = mode or G.chunk_mode(self.guidance, inputs, int(state.step), length)
        args = (self.sd.params, self.raft, inputs, state)
        return self.compiled(self._chunk, args, length=length, mode=mode)

    def compiled_evaluation(
        self, inputs, z, i: int, j: int, keys, mode: str = "guided", guidance=None, given=None
    ):
        """One compiled evaluation ((z_prev, z_next, logs, x0) of mgjax.method.guidance.evaluate,
        and the guidance term with reuse_gradient) and its arguments; guidance: as `compiled`;
        given: the guidance term a "reuse" evaluation applies."""
        i, j = jnp.asarray(i, jnp.int32), jnp.asarray(j, jnp.int32)
        args = (self.sd.params, self.raft, inputs, z, i, j, keys)
        if given is not None:
            args = (*args, given)
        return self.compiled(self._evaluation, args, guidance, mode=mode), args

    def run_chunk(self, inputs: GuidanceInputs, state: G.SamplerState, length: int | None = None):
        """Advance `length` DDIM steps (default: speed.chunk, cut at the end): (state, logs
        name -> f32[L,K,B], snapshots f32[L,B,H,W,3] or f32[L])."""
        left = self.method.steps - int(state.step)
        length = min(length or self.speed.chunk, left)
        if length <= 0:
            raise InputError("the sampler state is already at the last DDIM step")
        if self.loops == "unrolled":
            return self._run_unrolled(inputs, state, length)
        fn = self.compiled_chunk(inputs, state, length)
        return fn(self.sd.params, self.raft, inputs, state)

    def _run_unrolled(self, inputs, state, length: int):
        """The scan's evaluations in the same order, with the same noise, one compiled call each;
        guided and unguided steps are two compiled evaluations chosen per step on the host."""
        start, k_max = int(state.step), self.guidance.plan.k_max
        z, logs, snaps = state.z, [], []
        g = self.guidance_for(inputs)  # read once per chunk, not per evaluation
        ks = G.step_evaluations(g, inputs, start, length)
        reuse = g.plan.reuse_gradient
        for n, guided in enumerate(self.guided_steps(inputs, start, length)):
            z_t, step_logs, given = z, [], None
            for j in range(int(ks[n])):
                mode = "guided" if guided else "unguided"
                if reuse and guided and j > 0:
                    mode = "reuse"
                fn, args = self.compiled_evaluation(
                    inputs,
                    z_t,
                    start + n,
                    j,
                    state.keys,
                    mode,
                    g,
                    given if mode == "reuse" else None,
                )
                z, z_t, logs_j, x0, *rest = fn(*args)
                if reuse and j == 0:
                    given = rest[0]
                step_logs.append(logs_j)
                if j == 0:
                    snaps.append(x0 if self.guidance.snapshot_every else jnp.zeros((), z.dtype))
            for _ in range(k_max - len(step_logs)):  # slots the step does not run
                step_logs.append(
                    {key: jnp.full_like(v, jnp.nan) for key, v in step_logs[0].items()}
                )
            logs.append({key: jnp.stack([o[key] for o in step_logs]) for key in step_logs[0]})
        logs = {key: jnp.stack([o[key] for o in logs]) for key in logs[0]}
        return state.replace(z=z, step=state.step + length), logs, jnp.stack(snaps)

    def advance(self, inputs: GuidanceInputs, state: G.SamplerState):
        """One chunk, checked: (state, logs name -> f32[L,K,B] numpy, snapshots step ->
        f32[B,H,W,3] for the chunk's steps that fall on snapshot_every). Raises
        DivergenceError on NaN/inf in the latents or in an evaluated energy."""
        start = int(state.step)
        state, logs, snaps = self.run_chunk(inputs, state)
        logs = {k: np.asarray(v) for k, v in logs.items()}
        z_ok = np.asarray(jnp.isfinite(state.z).all(axis=(1, 2, 3)))
        # unguided steps (skip_unguided), reused guidance terms and skipped evaluation slots log
        # NaN energies by design
        evaluated = G.energy_slots(self.guidance, inputs, start, int(state.step) - start)
        e_ok = (np.isfinite(logs["energy"]) | ~evaluated[:, :, None]).all(axis=(0, 1))
        if not (z_ok.all() and e_ok.all()):
            bad = np.flatnonzero(~(z_ok & e_ok)).tolist()
            raise DivergenceError(
                f"guidance diverged (NaN/inf) in DDIM steps {start}..{int(state.step) - 1} "
                f"for batch images {bad}; lower the guidance weight or the clip norm",
                bad,
            )
        snapshots = {}
        every = self.guidance.snapshot_every
        if every:
            snaps = np.asarray(snaps)
            for n in range(snaps.shape[0]):
                if (start + n) % every == 0:
                    snapshots[start + n] = snaps[n]
        return state, logs, snapshots

    # ------------------------------------------------------------------ results

    def _final_energy(self, raft, x, inputs):
        e, terms = G.image_energy(self.guidance, raft, inputs, x)
        return {"energy": e, **terms}

    def final_energy(self, inputs: GuidanceInputs, images) -> dict[str, np.ndarray]:
        """The energy and its terms on final images f32[B,H,W,3] in [0, 1] (not a one-step
        estimate): name -> f32[B]."""
        out = self._final(self.raft, jnp.asarray(images, self.dtype), inputs)
        return {k: np.asarray(v) for k, v in out.items()}

    def decode(self, z, inputs: GuidanceInputs | None = None) -> np.ndarray:
        """Final latents -> images f32[B,H,W,3] in [0, 1] (clamped), as
        mgjax.method.guidance.final_image makes them: with method.paste_source the source's
        pixels where the inputs' frozen mask holds, so the inputs are needed then."""
        if inputs is None and self.method.paste_source:
            raise ValueError("paste_source needs the edit's inputs: decode(z, inputs)")
        x = self._decode(self.guidance, self.sd.params, inputs, z)
        return np.clip(np.asarray(x), 0.0, 1.0)

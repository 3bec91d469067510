"""The one configuration of an edit: frozen, nested by what each part decides, every default
written once (the paper's, MOTION_GUIDANCE.md).

    Config
      source  what is edited (an image, a reference folder, or a prompt + seed)
      motion  where it should move (a motion, drag points or a flow; the object; the frozen mask)
      model   which networks (Stable Diffusion, RAFT) and their numerics
      method  what the method computes (steps, K, weights, clip, CFG, the energy)
      speed   how fast it runs (compiled chunk, rematerialization, loops); the same result
      output  what it writes and where (out_dir, snapshots, resume)

Field names are unique across groups: they are launch.py's flag names and a jobs file's keys,
and `replace(config, name=value)` sets one by its flat name. Overrides come in layers, each
beating the ones before it (`resolve`):

    default < preset < explicit command-line flag < job line key

A job line's `preset` replaces the command line's preset in its layer; it never overrides a flag
given explicitly. This module imports no model code (launch.py --help stays fast).
"""

import dataclasses
import hashlib
import json
import math
import os
import typing
from collections.abc import Mapping

from mgjax.model.levers import ATTENTION, CFG_GRADIENTS, LOOPS, RAFT_GRADIENTS, REMAT_POLICIES


def parse_phases(text: str) -> tuple[int, ...]:
    """Method.recursive_phases as a tuple of K (empty: none); ValueError unless each is an
    integer from 1 to MAX_K."""
    if not isinstance(text, str):
        raise ValueError(f"recursive_phases must be a string, got {text!r}")
    if not text.strip():
        return ()
    try:
        phases = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"recursive_phases: give K,K,... (integers), got {text!r}") from None
    if min(phases) < 1:
        raise ValueError(f"recursive_phases: every K must be at least 1, got {text!r}")
    if max(phases) > MAX_K:
        raise ValueError(
            f"recursive_phases: every K must be from 1 to {MAX_K}, got {_short(max(phases))}; "
            "give smaller Ks"
        )
    return phases


def _field(default, help: str, choices: tuple | None = None):
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


# Upper bounds of the settings that size work or memory: each is past any useful value, and
# refusing more keeps a typo from running (or allocating) for ever.
TRAIN_TIMESTEPS = 1000  # the DDIM schedule the sampler implements: SD's 1000 training timesteps
MAX_K = 100  # recursive denoising steps per DDIM step (the paper's K is 10)
MAX_RAFT_ITERS = 100  # RAFT's own evaluations use 12 to 32
MAX_SAMPLES = 64  # edits of one source in one batch
# Pixel counts: the largest image a model takes is twice its side (2048 for SDXL), and a mask
# grown or dilated by its width plus height covers it whole.
MAX_MASK_GROW = 4096  # image pixels
MAX_LATENT_SIDE = 512  # latent pixels: --dilate, --paste_band
SEED_LIMIT = 2**32  # the sampler's PRNG keys are made from uint32 seeds
# Why each bound is where it is, as a message says it.
_WHY = {
    "seed": "the sampler's 32-bit random seeds",
    "steps": f"the schedule's {TRAIN_TIMESTEPS} training timesteps",
    "chunk": "the most DDIM steps a run has",
    "guide_every": "the most DDIM steps a run has",
    "log_every": "the most DDIM steps a run has",
    "stop_after_chunks": "the most chunks a run has",
    "mask_grow": "image pixels; more than the largest image's width plus height grows no further",
    "dilate": "latent pixels; more than the largest latent grid's side dilates no further",
    "paste_band": "latent pixels; more than the largest latent grid's side blends no further",
}


def _check(group, at_least: dict[str, float], at_most: dict[str, float] | None = None) -> None:
    """ValueError unless each named field is a finite number >= its bound (and <= its bound in
    `at_most`), and each field with choices holds one of them."""
    for name, low in at_least.items():
        value = getattr(group, name)
        high = (at_most or {}).get(name)
        # ints are compared as ints: a whole number too large for a float is still refused
        finite = isinstance(value, int) or math.isfinite(value)
        if not (finite and value >= low):
            bound = "at least 1" if low == 1 else f">= {low:g}"
            raise ValueError(f"{name} must be {bound}, got {_short(value)}")
        if high is not None and value > high:
            why = f" ({_WHY[name]})" if name in _WHY else ""
            raise ValueError(
                f"{name} must be from {_short(low)} to {_short(high)}{why}, got {_short(value)}; "
                "give a value in that range"
            )
    for f in dataclasses.fields(group):
        choices, value = f.metadata["choices"], getattr(group, f.name)
        if choices and value not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")


def _short(value) -> str:
    """A number as a message shows it: a whole number of many digits by its size alone."""
    text = str(value)
    return text if len(text) <= 24 else f"a number of {len(text)} digits"


def default_compilation_cache() -> str:
    """Where compiled samplers are kept between runs: $XDG_CACHE_HOME/mgjax/xla."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "mgjax", "xla")


@dataclasses.dataclass(frozen=True)
class Source:
    image: str | None = _field(None, "Real source image (RGB); it is DDIM-inverted first.")
    prompt: str = _field(
        "",
        "Prompt: generates the source with --seed when no --image / --data_dir is given, and "
        "conditions the edit.",
    )
    seed: int = _field(
        0, "Seed of the generated source's z_T and of the re-noising (sample n uses seed + n)."
    )
    data_dir: str | None = _field(
        None, "A folder in the reference format (pred.png, start_zt.pth, latents/, flows/)."
    )
    target_flow_name: str | None = _field(None, "With --data_dir: the flow file in flows/.")
    edit_mask_name: str | None = _field(None, "With --data_dir: the frozen mask in flows/.")
    resize: bool = _field(
        False,
        "Resize an --image whose size the model cannot take: to multiples of its factor, and "
        "one over twice the model's side down to that side.",
    )

    def __post_init__(self):
        _check(self, dict(seed=0), dict(seed=SEED_LIMIT - 1))


@dataclasses.dataclass(frozen=True)
class Motion:
    motion: str | None = _field(
        None,
        "translate:dx,dy | rotate:deg[@cx,cy] | scale:s[@cx,cy] | stretch:s,deg[@cx,cy] | "
        "homography:<4 src pts>:<4 dst pts>, joined by '+'.",
    )
    drag: str | None = _field(
        None,
        "Drag points instead of --motion: 'x1,y1>X1,Y1; x2,y2>X2,Y2' (one pair: a translation; "
        "two: the rotation and scale they imply; more: a smooth flow through all of them).",
    )
    object_mask: str | None = _field(
        None,
        "Object mask image for --motion: a pixel is object where its largest channel is above "
        "half the mask's largest value (0/1, 0/255 and coloured masks alike).",
    )
    object_box: str | None = _field(None, "Object box x0,y0,x1,y1 (pixels) for --motion.")
    flow: str | None = _field(None, "Target flow file instead of --motion: .npy, .flo, .pth.")
    frozen_mask: str = _field(
        "auto",
        "auto (dilated union of where the object is and goes), none, or a file "
        "(.pth/.npy/.png at latent size).",
    )
    # 2 latent pixels (16 image pixels at SD's factor 8); the toy preset sets its own (below).
    dilate: int = _field(2, "Dilation of the automatic frozen mask, in latent pixels.")
    # 0 in every preset: the flow moves the mask as given. On the toy tuning edits (BENCHMARKS.md,
    # "What the grown region adds") 2 px places objects whose mask is only their own colour
    # (generated sources) nearer, and costs objects whose mask is exact (one lost of 16).
    mask_grow: int = _field(
        0,
        "Grow --object_mask/--object_box by this many image pixels (4-connected) before the "
        "flow of --motion or --drag is made: the flow then carries the object's edge and a "
        "margin of its surroundings with it. The motion's centre stays the mask's.",
    )

    def __post_init__(self):
        _check(
            self, dict(dilate=0, mask_grow=0), dict(dilate=MAX_LATENT_SIDE, mask_grow=MAX_MASK_GROW)
        )


@dataclasses.dataclass(frozen=True)
class Model:
    model: str = _field(
        "toy",
        "toy (the shipped toy pack in mgjax/toy/pack; with no source and motion flags it runs "
        "its demo edit), a hub id (CompVis/stable-diffusion-v1-4), or a local diffusers folder.",
    )
    revision: str | None = _field("flax", "Hub revision (flax or bf16 for SD v1.4).")
    from_pt: bool = _field(False, "The model folder holds PyTorch weights (read without torch).")
    raft_weights: str | None = _field(
        None,
        "RAFT checkpoint: raft-things.pth (princeton-vl/RAFT) or a file from python -m "
        "flow.convert (default with --model toy: the pack's RAFT-small).",
    )
    dtype: str = _field(
        "float32",
        "Compute dtype of UNet, VAE and RAFT (the latents and the guidance stay float32).",
        ("float32", "bfloat16"),
    )
    attention: str = _field(
        "plain", "UNet attention: plain, or diffusers' memory-efficient chunked version.", ATTENTION
    )

    def __post_init__(self):
        _check(self, {})


@dataclasses.dataclass(frozen=True)
class Method:
    """What the method computes; the defaults are the paper's."""

    steps: int = _field(500, "DDIM steps.")
    recursive_steps: int = _field(10, "Recursive denoising steps K.")
    guidance_weight: float = _field(300.0, "lambda_g.")
    flow_weight: float = _field(3.0, "lambda_flow.")
    color_weight: float = _field(100.0, "lambda_color.")
    clip: float = _field(200.0, "Max L2 norm of the guidance term per image; 0 = off.")
    cfg_scale: float = _field(7.5, "Classifier-free guidance scale.")
    eta: float = _field(0.0, "DDIM eta.")
    occlusion_masking: bool = _field(True, "Mask covered background in the colour loss.")
    oracle: bool = _field(False, "Warp with the target flow in the colour loss.")
    raft_iters: int = _field(5, "RAFT iterations inside the energy.")
    raft_gradient: str = _field(
        "detached",
        "detached: the gradient through RAFT as the reference takes it (the flow estimate "
        "detached at every iteration); full: the exact gradient through all iterations.",
        RAFT_GRADIENTS,
    )
    preserve_weight: float = _field(
        0.0,
        "Adds this x PreservationEnergy (L1 to the source where nothing should move) to the "
        "paper's energy; 0 = the paper's energy alone.",
    )
    preserve_ramp: float = _field(
        1.0,
        "The preservation weight at the last DDIM step over its weight at the first; it changes "
        "linearly over the steps between them (1 = the same at every step).",
    )
    paste_source: bool = _field(
        False,
        "Paste the source image's pixels into the final image wherever the frozen mask holds in "
        "every latent channel (the decoder redraws even copied latents only as well as it "
        "reconstructs), blended over --paste_band latent pixels inside the frozen region's edge.",
    )
    paste_band: int = _field(
        1, "Depth in latent pixels over which --paste_source blends into the edited pixels."
    )
    warp_start: bool = _field(
        False,
        "Start from the source's z_T moved by the target flow (each latent pixel the object "
        "lands on takes the noise of the one it comes from, each it leaves the nearest "
        "background one's) instead of the z_T itself (the paper's).",
    )
    schedule: str | None = _field(None, "Guidance schedule .npy (one multiplier per step).")
    # Cost levers (docs/cost.md): each default is the paper's behaviour.
    guide_from: float = _field(
        0.0,
        "Guide only from this fraction of the DDIM steps on (0 = from the noisiest step); steps "
        "before it run as with guidance weight 0.",
    )
    guide_until: float = _field(
        1.0, "Guide only the steps before this fraction of the DDIM steps (1 = to the last)."
    )
    guide_every: int = _field(
        1, "Guide every n-th step of the guided window (counted from its first step); the "
        "others run as with guidance weight 0.",
    )  # fmt: skip
    recursive_phases: str = _field(
        "",
        "K per equal part of the DDIM steps, noisiest part first (e.g. 10,4,1); replaces "
        "--recursive_steps. Empty: --recursive_steps at every step.",
    )
    recurse_unguided: bool = _field(
        True,
        "Steps with guidance weight 0 repeat K times as guided ones do; false: once (a plain "
        "DDIM step).",
    )
    rescale_guidance: bool = _field(
        False,
        "Multiply the guidance term (after the clip) by what guide_every and smaller phase Ks "
        "remove: guide_every x (largest K / the step's K).",
    )
    reuse_gradient: bool = _field(
        False,
        "Evaluate the energy once per DDIM step and apply its guidance term in all K recursive "
        "evaluations (the others run the UNet alone).",
    )
    cfg_gradient: str = _field(
        "both",
        "both: the energy's gradient through both CFG branches of the UNet; cond: through the "
        "conditional branch alone (the unconditional one runs forward only).",
        CFG_GRADIENTS,
    )

    def __post_init__(self):
        _check(
            self,
            dict(steps=1, recursive_steps=1, raft_iters=1, clip=0, eta=0),
            dict(steps=TRAIN_TIMESTEPS, recursive_steps=MAX_K, raft_iters=MAX_RAFT_ITERS),
        )
        _check(
            self,
            dict(preserve_weight=0, preserve_ramp=0, paste_band=0),
            dict(paste_band=MAX_LATENT_SIDE),
        )
        _check(self, dict(guide_from=0, guide_every=1), dict(guide_every=TRAIN_TIMESTEPS))
        if not (self.guide_from < self.guide_until <= 1.0):
            raise ValueError(
                f"guide_from < guide_until <= 1 needed, got {self.guide_from}, {self.guide_until}"
            )
        phases = parse_phases(self.recursive_phases)
        if len(phases) > self.steps:
            raise ValueError(f"recursive_phases has {len(phases)} parts for {self.steps} steps")
        for name in ("guidance_weight", "flow_weight", "color_weight", "cfg_scale"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Speed:
    """How fast it runs; none of these changes what is computed (beyond rounding)."""

    chunk: int = _field(10, "DDIM steps per compiled chunk (and per checkpoint).")
    remat: str = _field(
        "none",
        "Recompute activations in the backward pass, per model (UNet, decoder, RAFT): none; dots "
        "(keep matmul/conv outputs); full (keep only each model's inputs); blocks (keep only the "
        "boundaries of each UNet and VAE block, RAFT as full). Less memory, more time.",
        tuple(REMAT_POLICIES),
    )
    skip_unguided: bool = _field(
        True,
        "Steps whose guidance weight x schedule is 0 run the UNet only (no energy, no backward).",
    )
    loops: str = _field(
        "auto",
        "scan: each chunk one compiled lax.scan; unrolled: one compiled evaluation per call, "
        "RAFT unrolled (XLA:CPU runs backward convolutions inside loops on a slow path); auto: "
        "unrolled on CPU, scan on GPU/TPU.",
        LOOPS,
    )
    source_cache: bool = _field(
        False,
        "Encode the source with RAFT once per edit, not in every guided evaluation (the same "
        "flow, less work; it changes the rounding, which guided runs amplify).",
    )
    compilation_cache: str = _field(
        default_compilation_cache(),
        "Persistent XLA compilation cache folder (empty: off); reruns skip compilation.",
    )

    def __post_init__(self):
        _check(self, dict(chunk=1), dict(chunk=TRAIN_TIMESTEPS))


@dataclasses.dataclass(frozen=True)
class Output:
    out_dir: str | None = _field(None, "Output folder.")
    num_samples: int = _field(1, "Edits of the same source, as one batch.")
    log_every: int = _field(0, "Save the decoded x0 estimate every N steps (0 = never).")
    resume: bool = _field(False, "Continue the run in --out_dir from its checkpoint.")
    overwrite: bool = _field(False, "Replace an existing --out_dir.")
    stop_after_chunks: int = _field(0, "Testing aid: stop as if interrupted.")

    def __post_init__(self):
        _check(
            self,
            dict(num_samples=1, log_every=0, stop_after_chunks=0),
            dict(
                num_samples=MAX_SAMPLES,
                log_every=TRAIN_TIMESTEPS,
                stop_after_chunks=TRAIN_TIMESTEPS,
            ),
        )


@dataclasses.dataclass(frozen=True)
class Config:
    source: Source = Source()
    motion: Motion = Motion()
    model: Model = Model()
    method: Method = Method()
    speed: Speed = Speed()
    output: Output = Output()

    def __post_init__(self):
        last = self.source.seed + self.output.num_samples - 1  # sample n uses seed + n
        if last >= SEED_LIMIT:
            raise ValueError(
                f"seed {self.source.seed} with num_samples {self.output.num_samples} uses seeds up "
                f"to {last}, over the largest seed {SEED_LIMIT - 1}; give a smaller seed"
            )


GROUPS = {f.name: f.type for f in dataclasses.fields(Config)}
# flat name -> (group, dataclasses.Field)
FIELDS = {f.name: (group, f) for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
assert len(FIELDS) == sum(len(dataclasses.fields(c)) for c in GROUPS.values()), "names clash"

# Fields that never change an edit's result: they may differ between a run and its --resume,
# are left out of its digest, and belong to a whole --jobs run rather than to one job.
RUN_LEVEL = (
    "out_dir",
    "log_every",
    "resume",
    "overwrite",
    "stop_after_chunks",
    "compilation_cache",
)

# Presets: the values they change from the defaults (which are the paper's).
#   fast: 250 x 4 = 1000 guided evaluations instead of 5000; the weights are the paper's.
#   toy: for the 64x64 toy pack (16x16x4 latents, 16x fewer elements than SD's 64x64x4). The
#   guidance is the gradient of a mean over pixels, so each latent element's share is 16x larger
#   than at 512x512: lambda_g / 16 matches the paper's push per element. The pack's models take
#   twice that: on 8 tuning edits (BENCHMARKS.md, "Settings for these models") lambda_g / 16
#   achieves 68% of the requested displacement and lambda_g / 8 75% (placement 1.84 -> 1.51 px);
#   3x or 4x achieve no more. The clip bounds an L2 norm over 16x fewer elements: clip / 4 is
#   the paper's per-element bound; the old clip / 8 throttles the doubled weight, twice the
#   clip (clip / 2) gains nothing more. Flows are in pixels, 8x smaller for the same relative
#   motion: lambda_flow x 8 keeps the paper's flow/colour balance. The colour loss warps the
#   edit by the target flow (oracle) instead of by RAFT's flow: RAFT-small's flow on a
#   half-denoised estimate is off by about a third of a translation, so warping by it asks the
#   edit to match the source where RAFT thinks it moved, not where it was asked to; the target
#   flow asks for the requested motion itself, and the flow term still goes through RAFT. On 16
#   tuning edits (BENCHMARKS.md, "Settings for these models") RAFT's warp places objects at
#   2.11 px, 60% of the displacement, IoU 0.61; the oracle warp at 1.41 px, 78%, 0.69; with
#   lambda_color x 2 at 1.29 px, 80%, 0.71 and 32.0 dB in the unchanged region (31.2 with
#   RAFT's warp). With the oracle warp these models take twice that flow weight when the colour
#   weight rises with it (lambda_flow x 16, lambda_color x 3): on 64 tuning edits (BENCHMARKS.md,
#   "The guidance balance") 1 object lost against 2, placement 1.17 against 1.18 px, 80% of the
#   displacement against 78%, IoU 0.75 against 0.73, colour error 8.0 against 10.2, 32.1
#   against 32.0 dB unchanged; translations 2.55 against 2.85 px, 76% against 72%, none of 16
#   lost against 1. Twice the flow weight alone costs 0.6 dB of the unchanged region; more
#   colour weight alone places objects worse (1.34 against 1.21 px on 16 edits). 100 steps
#   keep a demo object whole where fewer smear it under some CPUs' rounding. The automatic
#   frozen mask dilated by 3 latent pixels (12 image pixels) instead of 2: the editable band is
#   where the model blends the moved object into its surroundings, and on 64 tuning edits
#   (BENCHMARKS.md, "The guidance balance") 3 places objects nearer (1.16 against 1.25 px, 78%
#   of the displacement against 76%, IoU 0.74 against 0.73) and keeps the region that should
#   not change better (35.2 against 34.8 dB); 1 does worse on both (1.38 px, 34.6 dB). The
#   preservation term at the colour weight (preserve_weight = lambda_color: the region that
#   should not change pulled to the source twice as hard as the colour loss alone pulls it):
#   on 32 tuning edits it keeps that region 1.5 dB closer (36.1 against 34.5 dB) and the
#   disoccluded one 0.9 dB, and places objects as near (1.22 against 1.23 px, 78% of the
#   displacement both, IoU 0.72 both), where more colour weight keeps the region only by
#   placing objects worse (the colour loss also holds the object). K = 1 and CFG 1: the toy
#   UNet reconstructs an inverted source only at the inversion's settings (CFG 1, K = 1);
#   with K = 2 it reaches 0.98 px and 90% of the displacement on the tuning edits, but
#   unguided it loses 2 of 8 objects, so a "moved" object would prove nothing. The full
#   gradient through RAFT: with the detached one the demo's object is lost. The warped start
#   (warp_start, mgjax.method.start): the inverted z_T holds the object where it was, and these
#   models redraw it there from that noise against the guidance; started from z_T moved by the
#   target flow, on 32 tuning edits (BENCHMARKS.md, "A warped start") placement 0.91 against
#   1.41 px, 87% of the displacement against 75%, IoU 0.79 against 0.71, colour error 4.1
#   against 7.6, 18.9 against 17.1 dB disoccluded, 36.0 against 36.7 dB unchanged; the cells
#   the object leaves take the nearest background cell's noise (fresh noise there: 1.16 px,
#   79%; the object's own noise left there: 1.22 px, 78%). The warped start without guidance
#   overshoots and loses the scene (3 of 32 objects lost, IoU 0.57, 28.5 dB unchanged): the
#   guidance is what draws the object and keeps the rest. With it, preserve_weight 600 keeps
#   0.8 dB more of the unchanged region but places objects 0.08 px worse (85% of the
#   displacement against 87%), 1200 1.3 dB for 0.17 px: the clip binds through the first half
#   of the steps and the preservation term takes its share of that one bound (unclipped, it
#   loses half the objects). The preset keeps 300, which places objects best. A weight rising
#   over the steps (preserve_ramp; from 100 to 1200) keeps the region as 900 does (37.15 dB) at
#   0.95 px and 86% of the displacement; on the held-out edits it passes no guidance's region
#   (37.3 against 36.8 dB; with the paste below 39.7 against 39.2) but loses a translated
#   object the preset keeps: it stays an option.
#   The source pasted where the frozen mask holds (paste_source): the decoder redraws even
#   the latents copied from the source only as well as it reconstructs (35.5 dB on held-out
#   scenes), and pasting changes nothing else of the edit; on 32 tuning edits (BENCHMARKS.md,
#   "A warped start") the unchanged region 38.3 against 36.0 dB, placement, displacement, IoU,
#   colour and the disoccluded region as before (0.91 px, 87%, 0.79).
#   preview: a first look in a quarter of fast's evaluations: its steps halved, K = 2 (125 x 2
#   = 250 guided evaluations, 20x fewer than the paper's); the weights are the paper's.
#   toy_fast, toy_preview: what fast and preview are on the toy pack (`preset_for`): the toy
#   preset at 50 (toy_fast) and 25 (toy_preview) steps, a half and a quarter of its cost. Chosen
#   on the tuning split's cost front (bench/cost_frontier.py, docs/cost.md; measured with
#   RAFT's warp in the colour loss, before the toy preset's oracle warp): at the same cost,
#   fewer steps keep more of the displacement than guiding every 2nd or 4th step (rescaled or
#   not) or a shorter guided window (8 tuning edits: 50 steps share 0.83, IoU 0.71, against
#   0.76 and 0.69 for every 2nd step rescaled and 0.66, 0.66 for a window to 1/2; 25 steps 0.66
#   and 0.65, against 0.59 and 0.67 for every 4th step rescaled), because a step's
#   guidance push scales with its span in sigma, so fewer steps keep the summed push while
#   skipped guidance loses it. K stays 1: recursion is what the toy front's better points pay
#   for, and unguided it does not keep these models' scenes (see toy). Both keep the toy
#   preset's warped start: at 50 steps on 32 tuning edits it places objects at 0.92 against
#   1.42 px, 87% of the displacement against 73% (BENCHMARKS.md, "A warped start").
#   sdxl: for 1024x1024 images (128x128x4 latents, SDXL's native size), the same rule the other
#   way: 4x the latent elements of SD's 64x64x4, so lambda_g x 4; the clip bounds an L2 norm
#   over 4x more elements: clip x 2 is the same per-element bound; flows in pixels are 2x larger
#   for the same relative motion: lambda_flow / 2 keeps the flow/colour balance. Derived, not
#   tuned: untested on real SDXL weights (docs/sdxl.md).
_M = Method()
PRESETS: dict[str, dict] = {
    "paper": {},
    "fast": dict(steps=250, recursive_steps=4),
    "toy": dict(
        steps=100,
        recursive_steps=1,
        guidance_weight=_M.guidance_weight / 8,
        clip=_M.clip / 4,
        flow_weight=_M.flow_weight * 16,
        cfg_scale=1.0,
        raft_gradient="full",
        oracle=True,
        color_weight=_M.color_weight * 3,
        dilate=3,
        preserve_weight=_M.color_weight * 3,
        warp_start=True,
        paste_source=True,
    ),
    "sdxl": dict(
        guidance_weight=_M.guidance_weight * 4,
        clip=_M.clip * 2,
        flow_weight=_M.flow_weight / 2,
    ),
    "preview": dict(steps=125, recursive_steps=2),
}
PRESETS["toy_fast"] = dict(PRESETS["toy"], steps=50)
PRESETS["toy_preview"] = dict(PRESETS["toy"], steps=25)
TOY_MODEL = "toy"
# What a preset is on the toy pack, where it differs (the toy world's own settings).
TOY_PRESETS = {"auto": "toy", "fast": "toy_fast", "preview": "toy_preview"}


def preset_for(preset: str, model: str) -> str:
    """A preset name, resolved for the model: on the toy pack auto, fast and preview are the
    toy world's own (toy, toy_fast, toy_preview); elsewhere auto is paper."""
    if not isinstance(preset, str) or (preset != "auto" and preset not in PRESETS):
        raise ValueError(f"preset {preset!r}: one of auto, {', '.join(PRESETS)}")
    if model == TOY_MODEL:
        return TOY_PRESETS.get(preset, preset)
    return "paper" if preset == "auto" else preset


def _coerce(name: str, value):
    """`value` checked against the field's type (a JSON or flag value)."""
    hint = typing.get_type_hints(GROUPS[FIELDS[name][0]])[name]
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    kind = next((a for a in args if a is not type(None)), hint) if args else hint
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[kind]
    if not ok:
        raise ValueError(f"{name}: expected {kind.__name__}, got {json.dumps(value)}")
    if kind is float:
        try:
            return float(value)
        except OverflowError:  # a whole number past any float
            raise ValueError(f"{name} must be a finite number, got {_short(value)}") from None
    return value


def replace(config: Config, **values) -> Config:
    """`config` with fields set by their flat names (checked against their types)."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}")
    by_group: dict[str, dict] = {}
    for name, value in values.items():
        by_group.setdefault(FIELDS[name][0], {})[name] = _coerce(name, value)
    return dataclasses.replace(
        config,
        **{g: dataclasses.replace(getattr(config, g), **v) for g, v in by_group.items()},
    )


def make(**values) -> Config:
    """A Config from the defaults and flat-named values (no preset applied)."""
    return replace(Config(), **values)


def resolve(
    explicit: Mapping = {},  # noqa: B006 - read only
    preset: str = "auto",
    job: Mapping | None = None,
) -> Config:
    """The layered configuration: default < preset < explicit < job. `explicit` holds the values
    given explicitly (command-line flags), `job` a job line's keys (its "preset" replaces
    `preset`). "auto" is toy for the toy pack, paper otherwise."""
    job = dict(job or {})
    preset = job.pop("preset", None) or preset
    model = job.get("model", explicit.get("model", Model().model))
    layers = {**PRESETS[preset_for(preset, model)], **explicit, **job}
    return make(**layers)


def flat(config: Config) -> dict:
    """name -> value over all groups (config.json, the digest)."""
    return {name: getattr(getattr(config, g), name) for name, (g, _) in FIELDS.items()}


def digest(config: Config) -> str:
    """What an edit's result depends on, as a short hash (checkpoints check it on --resume)."""
    keep = {k: v for k, v in flat(config).items() if k not in RUN_LEVEL}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

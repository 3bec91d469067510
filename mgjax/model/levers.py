"""Settings shared by the sampler, the model seam and the command line: performance levers that
do not change the method, and the choice of RAFT gradient (this module imports no model code,
so `launch.py --help` stays fast)."""

import jax

# Rematerialization of each network call inside the energy (UNet, VAE decoder, RAFT), applied
# one model at a time so that only one model's activations are alive during the backward pass:
#   none: keep every activation (fastest, largest);
#   dots: keep matmul/convolution outputs, recompute norms and activations;
#   full: keep only each model's inputs and recompute its forward pass in the backward pass;
#   blocks: keep only the boundaries of each UNet and VAE block (down, mid, up), recomputing one
#     block's forward pass at a time in the backward pass (mgjax.model.remat); RAFT as under full.
# The value is the jax.checkpoint policy of a whole-model checkpoint (blocks: RAFT's).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
    "blocks": jax.checkpoint_policies.nothing_saveable,
}

# UNet attention: diffusers' plain softmax(QK^T)V, or its memory-efficient version (query and
# key chunks with a running softmax; diffusers computes it at HIGHEST matmul precision).
ATTENTION = ("plain", "memory_efficient")

# The gradient through RAFT inside the energy: "detached" as upstream RAFT and the Motion
# Guidance reference take it (the flow estimate detached at every refinement iteration, so only
# the last correlation lookup carries gradient), or "full", the exact gradient through every
# iteration (flow.raft.RaftConfig.detach = False).
RAFT_GRADIENTS = ("detached", "full")

# The energy's gradient through the UNet's classifier-free guidance: "both" branches, as the
# reference takes it, or the conditional one alone ("cond": the unconditional branch runs
# forward only, and CFG's Jacobian (1 - w) J_uncond + w J_cond is taken as J_cond).
CFG_GRADIENTS = ("both", "cond")

# How a chunk's guided evaluations are composed:
#   scan: the chunk is one compiled lax.scan over DDIM steps (the K evaluations an inner scan,
#     RAFT's refinement a scan inside that);
#   unrolled: one compiled evaluation per call, driven from Python, with RAFT's refinement
#     unrolled, so that no XLA while loop holds a backward pass. XLA:CPU runs the input-gradient
#     convolution inside a while loop on a slow path (the kernel stays in o,i order instead of
#     being transposed for its fast convolution library), so unrolled is faster there
#     (BENCHMARKS.md gives the figures).
#   auto: unrolled on CPU, scan on GPU and TPU.
LOOPS = ("auto", "scan", "unrolled")


def resolve_loops(loops: str, backend: str | None = None) -> str:
    """ "scan" or "unrolled" for a LOOPS value on `backend` (default: JAX's default backend)."""
    if loops != "auto":
        return loops
    return "unrolled" if (backend or jax.default_backend()) == "cpu" else "scan"

"""Performance settings that do not change the method, shared by the sampler, the model seam
and the command line (this module imports no model code, so `launch.py --help` stays fast)."""

import jax

# Rematerialization of each network call inside the energy (UNet, VAE decoder, RAFT), applied
# one model at a time so that only one model's activations are alive during the backward pass:
#   none: keep every activation (fastest, largest);
#   dots: keep matmul/convolution outputs, recompute norms and activations;
#   full: keep only each model's inputs and recompute its forward pass in the backward pass.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}

# UNet attention: diffusers' plain softmax(QK^T)V, or its memory-efficient version (query and
# key chunks with a running softmax; diffusers computes it at HIGHEST matmul precision).
ATTENTION = ("plain", "memory_efficient")

"""The method: Motion Guidance (Geng & Owens, ICLR 2024) and nothing else.

ddim      DDIM as small pure functions, with the paper's schedule
energy    guidance energies: the paper's flow + occlusion-masked colour loss, and composition
inputs    the per-edit arrays of the guided sampler, checked and assembled on the host
guidance  the guided step as pure functions: evaluate, recursive_step, step_chunk
source    source trajectories: DDIM generation and inversion
start     the first latent: the source's z_T, or z_T moved by the target flow
loop      the one sampling loop, chunk by chunk, with hooks
sampler   the driver: compiled chunks, NaN checks, decoding
"""

"""Writing an edit's results: each sample's pictures, metrics and configuration, and the
decoded snapshots of a running edit."""

import dataclasses
import functools
import os
import platform

import numpy as np

from flow.viz import flow_to_color
from mgjax import config as C
from mgjax.edit import outputs as out

METRIC_RAFT_ITERS = 12  # RAFT iterations of the achieved flow in the outputs and metrics


@dataclasses.dataclass
class EditResult:
    """One edit's (or one batch's) images and what its run measured."""

    source: np.ndarray  # f32[H,W,3] in [0, 1]
    flow: np.ndarray  # f32[H,W,2] the target flow
    obj: np.ndarray | None  # bool[H,W] the object mask, if any
    edited: np.ndarray  # f32[B,H,W,3] in [0, 1]
    logs: dict  # name -> f32[S,K,B]
    sampling_seconds: float
    wall_seconds: float


def save_snapshots(out_dir: str, snapshots: dict, first_sample: int = 0) -> None:
    """step -> f32[B,H,W,3] estimates into sample_NN/snapshots/ (NN from first_sample)."""
    for step, x in snapshots.items():
        for n in range(x.shape[0]):
            folder = os.path.join(out_dir, f"sample_{first_sample + n:02d}", "snapshots")
            os.makedirs(folder, exist_ok=True)
            out.save_png(out.snapshot_name(folder, step), out.to_uint8(x[n]))


@functools.cache
def _metric_flow_fn():
    import jax

    return jax.jit(lambda raft, a, b: raft(a, b, iters=METRIC_RAFT_ITERS))


def achieved_flow(raft, source, edited) -> np.ndarray:
    """RAFT's flow source -> edited (f32[B,H,W,3] in [0, 1]) at METRIC_RAFT_ITERS iterations."""
    return np.asarray(_metric_flow_fn()(raft, 255.0 * source, 255.0 * edited))


def versions() -> dict:
    found = {"python": platform.python_version()}
    for mod in ("jax", "flax", "diffusers", "transformers", "numpy"):
        found[mod] = __import__(mod).__version__
    return found


def write_samples(config: C.Config, sampler, inputs, result: EditResult, extra=None) -> None:
    """sample_NN/ for each edited image of `result`: source, edit, flows, panel, toggle, loss
    curves, metrics.json and config.json (files written atomically)."""
    image, flow, obj, logs = result.source, result.flow, result.obj, result.logs
    achieved = achieved_flow(sampler.raft, inputs.source, result.edited)
    moving = np.any(flow != 0, axis=-1) if obj is None else obj
    final = sampler.final_energy(inputs, result.edited)
    seed, found = config.source.seed, versions()
    norm = max(float(np.linalg.norm(flow, axis=-1).max()), 1e-6)
    terms = [k for k in sampler.log_names if k not in ("noise_norm", "guidance_norm")]
    for n, edited in enumerate(result.edited):
        folder = os.path.join(config.output.out_dir, f"sample_{n:02d}")
        os.makedirs(folder, exist_ok=True)
        path = lambda name, folder=folder: os.path.join(folder, name)  # noqa: E731
        src_u8, ed_u8 = out.to_uint8(image), out.to_uint8(edited)
        out.save_png(path("source.png"), src_u8)
        out.save_png(path("edited.png"), ed_u8)
        out.save_png(path("target_flow.png"), flow_to_color(flow, norm))
        out.save_npy(path("target_flow.npy"), np.asarray(flow, np.float32))
        if obj is not None:
            out.save_png(path("object_mask.png"), obj.astype(np.uint8) * 255)
        out.save_png(path("achieved_flow.png"), flow_to_color(achieved[n], norm))
        out.save_png(path("panel.png"), out.panel(image, flow, edited, achieved[n], norm))
        out.save_toggle_gif(path("toggle.gif"), src_u8, ed_u8)
        out.save_png(path("losses.png"), out.loss_plot({k: logs[k][..., n].ravel() for k in terms}))
        energies = logs["energy"][..., n].reshape(-1)
        guided = energies[np.isfinite(energies)]
        epe = np.linalg.norm(achieved[n] - flow, axis=-1)
        metrics = {
            "flow_epe_inside_object": float(epe[moving].mean()) if moving.any() else None,
            "flow_epe_outside_object": float(epe[~moving].mean()) if (~moving).any() else None,
            "flow_l1_final": float(np.abs(achieved[n] - flow).mean()),
            "raft_iters_for_metrics": METRIC_RAFT_ITERS,
            **{f"{k}_final": float(v[n]) for k, v in final.items()},
            "energy_last_evaluation": float(guided[-1]) if guided.size else None,
            "guided_evaluations": int(guided.size),  # steps with guidance 0 are skipped
            # evaluations that ran without an energy (unguided, or a reused guidance term);
            # evaluation slots a step does not run (recursive_phases) log NaN noise norms
            "unguided_evaluations": int(
                np.isfinite(logs["noise_norm"][..., n]).sum() - guided.size
            ),
            "sampling_seconds": result.sampling_seconds,
            "compile_seconds": sampler.compile_seconds,
            "loops": sampler.loops,  # what loops "auto" resolved to
            "wall_seconds": result.wall_seconds,
            "seed": seed + n,
            **(extra or {}),
        }
        out.save_json(path("metrics.json"), metrics)
        settings = C.flat(config) | {"sample_seed": seed + n, "versions": found}
        out.save_json(path("config.json"), settings)

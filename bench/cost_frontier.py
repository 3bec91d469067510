"""The cost/quality front of the cost levers: each lever alone at a few values and the promising
combinations, on the held-out toy bench, against what an edit costs.

  python -m bench.cost_frontier [--edits 16] [--split heldout|tuning] [--settings a,b,...]
      [--steps N] [--flops sd|toy|none] [--out runs/cost_frontier] [--resume]
  python -m bench.cost_frontier --list            # the settings and what each changes

Every setting is the toy world's base preset (--base, default toy) with some fields changed
(docs/cost.md explains each lever); `--steps N` replaces the base's step count, and settings
that cut the steps keep their share of it. Per setting it prints and writes:
  * evaluations and passes per edit (mgjax.method.cost.counts, as the toy run makes them):
    energy evaluations, evaluations without one (reused or unguided), UNet, VAE-decoder and
    RAFT forward/backward passes;
  * XLA's FLOPs per edit at SD v1.4 scale (--flops sd: abstract weights, as bench.full_scale
    and bench.sampler full; CFG on, as Stable Diffusion edits run): one compiled energy
    evaluation, one UNet-only evaluation and the final decode, each times its count (RAFT's
    refinement unrolled so that every iteration is counted); --flops toy: the same at the toy
    pack's size; none: skipped;
  * CPU wall time per edit on the toy pack (compilation included; its share apart);
  * bench.toy_quality's measures, means over the edits: object found, share of the requested
    displacement achieved, placement error (px), IoU with the moved object, PSNR of the region
    that should not change and of the disoccluded region.
Below the table: the reference point (the best displacement share + IoU) and, for 4x and 10x
fewer FLOPs, the setting that loses least against it (what `fast` and `preview` are chosen
from); each setting's share and IoU minus the reference's, edit by edit (mean +- standard
error: the differences this many edits resolve); then what each preset costs at that scale.
OUT/results.json, OUT/table.md and OUT/frontier.png (each measure against TFLOP per edit, the
Pareto front marked: no other setting is both cheaper and better). Resumable: each setting's
result is kept in OUT/<setting>/result.json (its batches as bench.toy_quality keeps them), the
FLOP counts in OUT/flops.json; --resume continues a run with the same --edits, --split, --steps,
--base and models.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench import toy_quality as TQ
from bench.timing import xla_flops
from mgjax import config as C
from mgjax.method import cost

# name -> the fields a setting changes from the base; "steps_share" keeps that share of the
# base's steps. Each lever alone at a few values, then combinations.
SETTINGS: dict[str, dict] = {
    "base": {},
    "steps 1/2": dict(steps_share=0.5),
    "steps 1/4": dict(steps_share=0.25),
    "steps 1/8": dict(steps_share=0.125),
    "steps x2": dict(steps_share=2.0),
    "window to 3/4": dict(guide_until=0.75, recurse_unguided=False),
    "window to 1/2": dict(guide_until=0.5, recurse_unguided=False),
    "window from 1/10": dict(guide_from=0.1, recurse_unguided=False),
    "every 2nd": dict(guide_every=2, recurse_unguided=False),
    "every 2nd rescaled": dict(guide_every=2, recurse_unguided=False, rescale_guidance=True),
    "every 4th rescaled": dict(guide_every=4, recurse_unguided=False, rescale_guidance=True),
    "raft 3": dict(raft_iters=3),
    "raft 2": dict(raft_iters=2),
    "raft 1": dict(raft_iters=1),
    "K 2": dict(recursive_steps=2),
    "K phases 2-1": dict(recursive_phases="2,1"),
    "K 2 reused gradient": dict(recursive_steps=2, reuse_gradient=True),
    "K phases 3-2-1 rescaled": dict(recursive_phases="3,2,1", rescale_guidance=True),
    "CFG 3 cond gradient": dict(cfg_scale=3.0, cfg_gradient="cond"),
    "CFG 3": dict(cfg_scale=3.0),
    "steps 1/2 + raft 3": dict(steps_share=0.5, raft_iters=3),
    "every 2nd rescaled + raft 3": dict(
        guide_every=2, recurse_unguided=False, rescale_guidance=True, raft_iters=3
    ),
    "window to 3/4 + every 2nd rescaled": dict(
        guide_until=0.75, guide_every=2, recurse_unguided=False, rescale_guidance=True
    ),
    "steps 1/4 + every 2nd rescaled": dict(
        steps_share=0.25, guide_every=2, recurse_unguided=False, rescale_guidance=True
    ),
    "steps 1/2 + K phases 2-1": dict(steps_share=0.5, recursive_phases="2,1"),
    "steps 1/2 + every 2nd rescaled + raft 3": dict(
        steps_share=0.5, guide_every=2, recurse_unguided=False, rescale_guidance=True, raft_iters=3
    ),
}
QUALITY = {  # measure -> which way is better
    "found": "higher",
    "displacement_share": "nearer 1",  # the share of the requested motion: over 1 overshoots
    "placement_px": "lower",
    "iou": "higher",
    "psnr_unchanged": "higher",
    "psnr_disoccluded": "higher",
}


def goodness(values, better: str) -> np.ndarray:
    """Values mapped so that higher is better (QUALITY's directions)."""
    v = np.asarray(values, np.float64)
    return {"higher": v, "lower": -v, "nearer 1": -np.abs(v - 1.0)}[better]


PASSES = ("unet", "vae", "raft")


def method_of(base: str, settings: dict, steps: int = 0) -> dict:
    """The method fields of a setting: the base preset's (steps replaced by `steps` if given),
    then the setting's."""
    values = dict(C.PRESETS[base])
    if steps:
        values["steps"] = steps
    values = {k: v for k, v in C.flat(C.make(**values)).items() if k in C.FIELDS}
    method = {f: values[f] for f in C.FIELDS if C.FIELDS[f][0] == "method"}
    settings = dict(settings)
    share = settings.pop("steps_share", None)
    if share is not None:
        method["steps"] = max(1, round(method["steps"] * share))
    method.update(settings)
    C.make(**method)  # checked
    return method


# ----------------------------------------------------------------------------- FLOPs


def flops_key(method: C.Method, scale: str) -> dict:
    """What one evaluation's FLOP count depends on."""
    cfg = True if scale == "sd" else method.cfg_scale != 1.0
    return dict(
        scale=scale,
        raft_iters=method.raft_iters,
        raft_gradient=method.raft_gradient,
        cfg=cfg,
        cfg_gradient=method.cfg_gradient if cfg else "both",
    )


def _lowerable(key: dict, sd, raft):
    """(sampler, params, raft, edit, z, keys) for one evaluation of the key's settings, at SD
    v1.4 scale (abstract weights) or on the toy pack's models."""
    settings = dict(
        raft_iters=key["raft_iters"],
        raft_gradient=key["raft_gradient"],
        cfg_scale=7.5 if key["cfg"] else 1.0,
        cfg_gradient=key["cfg_gradient"],
        loops="unrolled",  # RAFT unrolled: XLA's cost analysis counts a loop body once
        steps=1,
        recursive_steps=1,
    )
    if key["scale"] == "sd":
        from bench.sampler import abstract_sd14

        return abstract_sd14("float32", **settings)
    from mgjax.method.sampler import Sampler

    sampler = Sampler.of(sd, raft, **settings)
    size = sd.unet.config.sample_size * sd.vae_factor
    lat = sd.unet.config.sample_size
    edit = sampler.prepare(
        np.zeros((1, size, size, 3), np.float32),
        np.zeros((1, size, size, 2), np.float32),
        sd.embed(""),
        sd.embed(""),
        trajectory=np.zeros((1, 1, sd.latent_channels, lat, lat), np.float32),
    )
    state = sampler.init(edit, np.zeros(edit.frozen.shape, np.float32), seeds=0)
    return sampler, sd.params, raft, edit, state.z, state.keys


def evaluation_flops(key: dict, sd, raft) -> dict:
    """XLA's FLOPs of one energy evaluation, one UNet-only evaluation and the final decode."""
    import jax

    from mgjax.method import guidance as G

    sampler, params, raft, edit, z, keys = _lowerable(key, sd, raft)

    def count(fn, *args) -> float:
        t = time.perf_counter()
        flops = xla_flops(jax.jit(fn).lower(*args).compile()) or float("nan")
        print(f"    compiled for its FLOPs in {time.perf_counter() - t:.0f} s", flush=True)
        return flops

    def evaluation(mode):
        return lambda p, r, e, z, k: G.evaluate(sampler.guidance, p, r, e, z, 0, 0, k, mode).z_prev

    return dict(
        energy=count(evaluation("guided"), params, raft, edit, z, keys),
        unet_only=count(evaluation("unguided"), params, raft, edit, z, keys),
        decode=count(sampler.sd.decode, params, z),
    )


def edit_flops(counts: dict, per: dict) -> float:
    """FLOPs of an edit from its evaluation counts and the FLOPs of each kind."""
    others = counts["reused_evaluations"] + counts["unguided_evaluations"]
    return counts["energy_evaluations"] * per["energy"] + others * per["unet_only"] + per["decode"]


# ----------------------------------------------------------------------------- the front


def pareto(costs, values) -> np.ndarray:
    """bool[N]: the points no other point beats in both (cost no higher and value higher, or
    cost lower and value no lower); NaN values are never on it."""
    c = np.asarray(costs, np.float64)
    v = np.asarray(values, np.float64)
    on = np.isfinite(c) & np.isfinite(v)
    for i in np.flatnonzero(on):
        others = on & (np.arange(len(c)) != i)
        beaten = others & (c <= c[i]) & (v >= v[i]) & ((c < c[i]) | (v > v[i]))
        on[i] = not beaten.any()
    return on


def front_plot(rows: list[dict]) -> np.ndarray:
    """One panel per quality measure against TFLOP per edit (log), the front marked: u8[H,W,3]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 7.5), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    tflops = np.array([_nan(r["tflop_per_edit"]) for r in rows], np.float64)
    for n, (measure, better) in enumerate(QUALITY.items()):
        ax = fig.add_subplot(2, 3, n + 1)
        values = np.array([_nan(r["quality"].get(measure)) for r in rows], np.float64)
        on = pareto(tflops, goodness(values, better))
        ax.scatter(tflops, values, c="C0", s=18)
        order = np.flatnonzero(on)[np.argsort(tflops[on])]
        ax.plot(tflops[order], values[order], "-o", c="C3", ms=5, label="Pareto front")
        for i in order:
            ax.annotate(rows[i]["name"], (tflops[i], values[i]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        if np.isfinite(tflops).any() and np.nanmin(tflops) > 0:
            ax.set_xscale("log")
        ax.set_xlabel("TFLOP per edit")
        ax.set_title(f"{measure} ({better} is better)", fontsize=9)
        if n == 0:
            ax.legend(fontsize=7)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def quality_score(row: dict) -> float:
    """A setting's quality as one number: its displacement share (capped at 1, an overshoot is
    no better) plus its IoU, both on a 0-1 scale; NaN where either is missing."""
    q = row["quality"]
    share, iou = _nan(q.get("displacement_share")), _nan(q.get("iou"))
    return min(share, 1.0) + iou


def picks(rows: list[dict], factors=(4, 10)) -> dict:
    """The reference (the best quality_score) and, per cost factor f, the setting that loses
    least against it among those costing at most 1/f of its FLOPs: the largest relative loss in
    displacement share or IoU, smallest. {"reference": name, f: {name, factor, share_loss,
    iou_loss} or None}."""
    scored = [r for r in rows if np.isfinite(quality_score(r)) and r["tflop_per_edit"]]
    if not scored:
        return {"reference": None}
    ref = max(scored, key=quality_score)
    out: dict = {"reference": ref["name"]}

    def loss(r, m):  # relative; NaN where the reference has nothing to lose
        whole = min(ref["quality"][m], 1.0)
        return 1.0 - min(r["quality"][m], 1.0) / whole if whole > 0 else np.nan

    for f in factors:
        cheap = [r for r in scored if r["tflop_per_edit"] * f <= ref["tflop_per_edit"]]
        best = min(cheap, default=None,
                   key=lambda r: _worst(loss(r, "displacement_share"), loss(r, "iou")))  # fmt: skip
        out[f] = best and dict(
            name=best["name"],
            factor=ref["tflop_per_edit"] / best["tflop_per_edit"],
            share_loss=loss(best, "displacement_share"),
            iou_loss=loss(best, "iou"),
        )
    return out


def _worst(*losses) -> float:
    """The largest of the losses that are numbers (inf if none is)."""
    finite = [x for x in losses if np.isfinite(x)]
    return max(finite) if finite else np.inf


def picks_text(chosen: dict) -> str:
    if chosen["reference"] is None:
        return "no setting has both FLOPs and quality: no reference"
    lines = [f"reference (best share + IoU): {chosen['reference']}"]
    for f, p in chosen.items():
        if f == "reference":
            continue
        if p is None:
            lines.append(f"{f}x fewer FLOPs: no setting is that cheap")
        else:
            lines.append(
                f"{f}x fewer FLOPs: {p['name']} ({p['factor']:.1f}x fewer; share "
                f"{-100 * p['share_loss']:+.0f}%, IoU {-100 * p['iou_loss']:+.0f}%)"
            )
    return "\n".join(lines)


PRESET_NAMES = ("paper", "fast", "preview", "toy", "toy_fast", "toy_preview")


def edit_cost(name: str, config, scale: str, flops_cache: dict, sd, raft) -> tuple[dict, float]:
    """(evaluation counts, TFLOP per edit) of a config at the scale's size (CFG on at SD scale),
    counting the FLOPs of an evaluation kind not yet in flops_cache (which it fills)."""
    key = flops_key(config.method, scale)
    k = json.dumps(key, sort_keys=True)
    if k not in flops_cache:
        print(f"{name}: counting FLOPs of {key}", flush=True)
        flops_cache[k] = evaluation_flops(key, sd, raft)
    counts = cost.counts(config.method, config.speed, cfg=key["cfg"])
    return counts, edit_flops(counts, flops_cache[k]) / 1e12


def preset_costs(scale: str, flops_cache: dict, sd, raft) -> list[dict]:
    """Each preset's evaluations and TFLOP per edit at the scale's size (edit_cost)."""
    out = []
    for name in PRESET_NAMES:
        config = C.make(**method_of(name, {}))
        counts, tflop = edit_cost(f"preset {name}", config, scale, flops_cache, sd, raft)
        out.append(dict(name=name, counts=counts, tflop_per_edit=tflop))
    return out


def preset_table(costs: list[dict]) -> str:
    paper = next(c["tflop_per_edit"] for c in costs if c["name"] == "paper")
    lines = [
        "| preset | energy evals | other evals | TFLOP / edit | x fewer than paper |",
        "| --- | --- | --- | --- | --- |",
    ]
    for c in costs:
        n = c["counts"]
        lines.append(
            f"| {c['name']} | {n['energy_evaluations']} | "
            f"{n['reused_evaluations'] + n['unguided_evaluations']} | "
            f"{c['tflop_per_edit']:.4g} | {paper / c['tflop_per_edit']:.1f} |"
        )
    return "\n".join(lines)


def paired(rows: list[dict], reference: str, measures=("displacement_share", "iou")) -> str:
    """Each setting's per-edit difference from the reference, edit by edit (the same scenes; a
    setting with another step count generates its sources anew, so a generated source and the
    drags drawn on it differ), as mean +- standard error: what this many edits tell apart."""
    by_name = {r["name"]: r for r in rows}

    def column(row, m):
        values = {x["edit"]: x.get(m) for x in row["rows"]}
        return {e: float(v) for e, v in values.items() if v is not None}

    head = "| setting | " + " | ".join(f"{m} - reference" for m in measures) + " |"
    lines = [head, "|" + " --- |" * (len(measures) + 1)]
    ref_columns = {m: column(by_name[reference], m) for m in measures}
    for row in rows:
        cells = []
        for m in measures:
            mine, ref = column(row, m), ref_columns[m]
            d = np.array([mine[e] - ref[e] for e in sorted(mine.keys() & ref.keys())])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
            cells.append(f"{d.mean():+.3f} +- {se:.3f}" if len(d) else "-")
        lines.append(f"| {row['name']} | {' | '.join(cells)} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = (
        "| setting | energy evals | other evals | UNet f/b | VAE f/b | RAFT f/b | TFLOP / edit "
        "| CPU s / edit | " + " | ".join(QUALITY) + " | front (IoU) |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    on = pareto([_nan(r["tflop_per_edit"]) for r in rows],
                [_nan(r["quality"].get("iou")) for r in rows])  # fmt: skip
    for r, front in zip(rows, on, strict=True):
        c = r["counts"]
        passes = [f"{c[f'{p}_forward']}/{c[f'{p}_backward']}" for p in PASSES]
        flops = "-" if r["tflop_per_edit"] is None else f"{r['tflop_per_edit']:.3g}"
        quality = [_fmt(r["quality"].get(m)) for m in QUALITY]
        lines.append(
            f"| {r['name']} | {c['energy_evaluations']} | "
            f"{c['reused_evaluations'] + c['unguided_evaluations']} | {' | '.join(passes)} | "
            f"{flops} | {r['seconds_per_edit']:.1f} | {' | '.join(quality)} | "
            f"{'yes' if front else ''} |"
        )
    return "\n".join(lines)


def _nan(x) -> float:
    return np.nan if x is None else float(x)


def _fmt(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.2f}"


# ----------------------------------------------------------------------------- driver


def measure(
    name: str,
    method: dict,
    cases,
    sd,
    raft,
    out: Path,
    sources: dict,
    dilate: int,
    mask_grow: int = 0,
) -> dict:
    """Run the setting's edits with bench.toy_quality's runner (the automatic frozen mask
    dilated by `dilate` and the object grown by `mask_grow` before its flow is made, the base
    preset's) and score them."""
    key = (method["steps"], method["cfg_scale"])
    if key not in sources:
        sources[key] = TQ.prepare(cases, sd, method, TQ.autoencoder_keep(sd))
    prepared = sources[key]
    folder = out / _folder(name)
    folder.mkdir(parents=True, exist_ok=True)
    runner = TQ.UnitRunner(_folder(name), method, sd, raft, folder, float("inf"), dilate,
                           mask_grow=mask_grow)  # fmt: skip
    if not runner.done(0, prepared):
        runner.run(0, prepared)
    edited, seconds = runner.load(0)
    rows = TQ.score(_folder(name), prepared, edited, raft, folder)
    quality = {}
    for m in QUALITY:
        vals = [float(r[m]) for r in rows if r.get(m) is not None]
        quality[m] = float(np.mean(vals)) if vals else None
    compile_s = runner.sampler().compile_seconds
    return dict(
        edits=len(rows), seconds=seconds, compile_seconds=compile_s, quality=quality, rows=rows
    )


def _folder(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edits", type=int, default=16)
    parser.add_argument("--split", choices=("heldout", "tuning"), default="heldout")
    parser.add_argument("--settings", default="", help="a comma list of setting names (--list)")
    parser.add_argument("--base", default="toy", choices=sorted(C.PRESETS))
    parser.add_argument("--steps", type=int, default=0, help="replace the base's DDIM steps")
    parser.add_argument("--flops", choices=("sd", "toy", "none"), default="sd")
    parser.add_argument("--model", default=None, help="a diffusers folder (default: the pack's)")
    parser.add_argument("--raft", default=None, help="RAFT weights (default: the pack's)")
    parser.add_argument("--out", default="runs/cost_frontier")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the settings and stop")
    args = parser.parse_args()
    if args.list:
        for name, values in SETTINGS.items():
            print(f"{name}: {values or 'the base'}")
        return
    names = [n.strip() for n in args.settings.split(",") if n.strip()] or list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        sys.exit(f"unknown settings {unknown}; --list shows them")
    if args.edits < 1:
        sys.exit("--edits must be at least 1")

    from flow.checkpoint import load_raft
    from mgjax.model import sd as sdm
    from mgjax.toy import pack, quality

    out = Path(args.out)
    model, raft_file = args.model or pack.sd_folder(), args.raft or pack.raft_file()
    run = dict(edits=args.edits, split=args.split, steps=args.steps, base=args.base,
               model=model, raft=raft_file)  # fmt: skip
    if (out / "run.json").exists():
        if not args.resume:
            sys.exit(f"{out} holds a run; pass --resume to continue it or choose another --out")
        if json.loads((out / "run.json").read_text()) != run:
            sys.exit(f"{out} was run with {(out / 'run.json').read_text().strip()}")
    out.mkdir(parents=True, exist_ok=True)
    TQ.write_json(out / "run.json", run)
    flops_file = out / "flops.json"
    flops_cache = json.loads(flops_file.read_text()) if flops_file.exists() else {}

    sd, raft = sdm.load(model), load_raft(raft_file)
    size = sd.unet.config.sample_size * sd.vae_factor
    seeds = quality.HELDOUT_SEEDS if args.split == "heldout" else quality.TUNING_SEEDS
    cases = [TQ.Case(n, size, seeds) for n in range(args.edits)]
    sources, rows = {}, []
    for name in names:
        saved = out / _folder(name) / "result.json"
        method = method_of(args.base, SETTINGS[name], args.steps)
        if saved.exists():
            row = json.loads(saved.read_text())
            if row["method"] != method:
                sys.exit(f"{saved} was measured with other settings; delete its folder")
            rows.append(row)
            print(f"{name}: measured in an earlier run", flush=True)
            continue
        config = C.make(**method)
        counts = cost.counts(config.method, config.speed)
        tflop = None
        if args.flops != "none":
            _, tflop = edit_cost(name, config, args.flops, flops_cache, sd, raft)
            TQ.write_json(flops_file, flops_cache)
        print(f"{name}: {counts['energy_evaluations']} energy evaluations, running", flush=True)
        result = measure(
            name, method, cases, sd, raft, out, sources, TQ.preset_dilate(args.base),
            TQ.preset_mask_grow(args.base),
        )  # fmt: skip
        row = dict(
            name=name,
            method=method,
            counts=counts,
            tflop_per_edit=tflop,
            flops_scale=args.flops,
            seconds_per_edit=result["seconds"] / max(result["edits"], 1),
            **{k: v for k, v in result.items() if k != "seconds"},
            commit=TQ.code_commit(),
        )
        TQ.write_json(saved, row)
        rows.append(row)
    chosen = picks(rows)
    text = table(rows) + "\n\n" + picks_text(chosen)
    if chosen["reference"] is not None:
        text += "\n\nPer edit, against the reference:\n\n" + paired(rows, chosen["reference"])
    if args.flops != "none":
        costs = preset_costs(args.flops, flops_cache, sd, raft)
        TQ.write_json(flops_file, flops_cache)
        text += "\n\n" + preset_table(costs)
    print(text)
    (out / "table.md").write_text(text + "\n")
    TQ.write_json(out / "results.json", {"run": run, "settings": rows, "picks": chosen})
    from mgjax.edit import outputs

    outputs.save_png(str(out / "frontier.png"), front_plot(rows))
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {out / 'frontier.png'}")


if __name__ == "__main__":
    main()

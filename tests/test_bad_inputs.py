"""Every command line against bad input, as a user meets it: one table of cases, each with its
expected exit status and words. A bad input gives one `error:` line (no traceback), exit status
2, nothing written, and nobody's files touched. Each command line's cases run in one process
(tests/cli_runner.py); the model-free checks come before any model loads, so most cases take
milliseconds (the test prints the slowest)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mgjax.toy import pack
from tests.hostile import png_declaring
from tests.torch_raft import random_torchvision_raft

ROOT = Path(__file__).resolve().parents[1]

# launch.py: a valid edit of the toy pack's demo scene, each case changing one thing
EDIT = ["--image={demo}", "--object_mask={mask}", "--motion=translate:3,0", "--steps=2"]
OUT = ["--out_dir={work}/o", "--compilation_cache="]

CASES = [
    # (command, arguments, exit status, words in the message)
    ("launch", [*EDIT, *OUT, "--steps=0"], 2, "steps must be at least 1"),
    ("launch", [*EDIT, *OUT, "--recursive_steps=0"], 2, "recursive_steps must be at least 1"),
    ("launch", [*EDIT, *OUT, "--chunk=0"], 2, "chunk must be at least 1"),
    ("launch", [*EDIT, *OUT, "--raft_iters=0"], 2, "raft_iters must be at least 1"),
    ("launch", [*EDIT, *OUT, "--num_samples=0"], 2, "num_samples must be at least 1"),
    ("launch", [*EDIT, *OUT, "--guidance_weight=nan"], 2, "guidance_weight must be a finite"),
    ("launch", [*EDIT, *OUT, "--cfg_scale=inf"], 2, "cfg_scale must be a finite number"),
    ("launch", [*EDIT, *OUT, "--flow_weight=nan"], 2, "flow_weight must be a finite number"),
    ("launch", [*EDIT, *OUT, "--color_weight=-inf"], 2, "color_weight must be a finite"),
    ("launch", [*EDIT, *OUT, "--clip=-1"], 2, "clip must be >= 0"),
    ("launch", [*EDIT, *OUT, "--clip=nan"], 2, "clip must be >= 0"),
    ("launch", [*EDIT, *OUT, "--eta=-0.5"], 2, "eta must be >= 0"),
    ("launch", [*EDIT, *OUT, "--preserve_weight=-1"], 2, "preserve_weight must be >= 0"),
    ("launch", [*EDIT, *OUT, "--log_every=-1"], 2, "log_every must be >= 0"),
    ("launch", [*EDIT, *OUT, "--dilate=-1"], 2, "dilate must be >= 0"),
    ("launch", [*EDIT, *OUT, "--image={work}/none.png"], 2, "no such image file"),
    ("launch", [*EDIT, *OUT, "--object_mask={work}/none.png"], 2, "no such object mask file"),
    ("launch", [*EDIT, *OUT, "--motion=spin:3"], 2, "unknown motion 'spin'"),
    ("launch", [*EDIT, *OUT, "--motion=translate:1"], 2, "translate"),
    ("launch", [*EDIT, *OUT, "--motion=rotate:x"], 2, "rotate"),
    ("launch", [*EDIT, *OUT, "--motion="], 2, "no motion"),
    ("launch", [*EDIT, *OUT, "--drag=1,2>3,4"], 2, "not --motion and --drag"),
    ("launch", [*EDIT, *OUT, "--motion=", "--drag=1,2>3"], 2, "is not 'x,y>X,Y'"),
    ("launch", [*EDIT, *OUT, "--flow={work}/f.npy"], 2, "give one of --motion, --flow"),
    ("launch", [*EDIT, *OUT, "--object_box=1,2,3"], 2, "--object_box"),
    ("launch", [*EDIT, *OUT, "--object_box=1,2,30,40"], 2, "--object_mask or --object_box"),
    ("launch", [*EDIT, *OUT, "--data_dir={work}/none"], 2, "give one source"),
    ("launch", [*OUT, "--motion=translate:1,0"], 2, "no source"),
    ("launch", [*EDIT, *OUT, "--raft_weights={work}/none.pth"], 2, "no such RAFT weights file"),
    ("launch", [*EDIT, *OUT, "--schedule={work}/none.npy"], 2, "no such guidance schedule"),
    ("launch", [*EDIT, "--out_dir={file}"], 2, "is a file; give the path of a folder"),
    ("launch", [*EDIT, "--out_dir={file}/o"], 2, "is a file, not a folder"),
    ("launch", [*EDIT, "--out_dir={foreign}"], 2, "was not written by mgjax"),
    ("launch", [*EDIT, "--out_dir={foreign}", "--overwrite"], 2, "replaces only mgjax's own"),
    ("launch", [*EDIT, *OUT, "--resume"], 2, "holds no run of mgjax's to continue"),
    ("launch", [*EDIT, *OUT, "--resume", "--overwrite"], 2, "exclude each other"),
    ("launch", EDIT, 2, "--out_dir is required"),
    ("launch", [*EDIT, *OUT, "extra"], 2, "unexpected arguments ['extra']"),
    ("launch", [*EDIT, *OUT, "--model=nohub", "--raft_weights={raft}"], 2, "give a hub id"),
    ("launch", [*EDIT, *OUT, "--model={work}/none/", "--raft_weights={raft}"], 2, "no such folder"),
    ("launch", [*EDIT, *OUT, "--model={no_tokenizer}", "--raft_weights={raft}"], 2,
     "no tokenizer/ subfolder"),
    ("launch", [*EDIT, *OUT, "--model=a/b", "--raft_weights={raft}"], 2, "not in the local hub"),
    ("launch", [*EDIT, *OUT, "--compilation_cache={file}/x"], 2, "cannot create it"),
    # found once the model is known (its sizes): the toy pack loads in a second or two
    ("launch", [*EDIT, *OUT, "--image={bomb}"], 2, "pixels allowed"),
    ("launch", [*EDIT, *OUT, "--image={odd}"], 2, "is not a multiple of"),
    ("launch", [*EDIT, *OUT, "--image={tiny}"], 2, "smaller than the 64x64 RAFT needs"),
    ("launch", [*EDIT, *OUT, "--image={text}"], 2, "not a readable image"),
    ("launch", [*EDIT, *OUT, "--image={gray}"], 2, "1 channel(s) (L)"),
    ("launch", [*EDIT, *OUT, "--object_mask={bomb}"], 2, "pixels allowed"),
    ("launch", [*EDIT, *OUT, "--object_mask={small_mask}"], 2, "mask is 32x32 but the image"),
    ("launch", [*EDIT, *OUT, "--object_mask={empty_mask}"], 2, "the object mask is empty"),
    ("launch", [*EDIT, *OUT, "--object_mask={pickled}"], 2, "holds object data"),
    ("launch", [*EDIT, *OUT, "--object_box=0,0,99,10", "--object_mask="], 2, "needs 0 <= x0"),
    ("launch", [*EDIT, *OUT, "--motion=", "--flow={flow_small}"], 2, "but the image needs"),
    ("launch", [*EDIT, *OUT, "--motion=", "--flow={flow_nan}"], 2, "NaN or inf"),
    ("launch", [*EDIT, *OUT, "--motion=", "--flow={text}"], 2, "must be .npy, .flo or .pth"),
    ("launch", [*EDIT, *OUT, "--frozen_mask={frozen_small}"], 2, "at the latent grid's size"),
    ("launch", [*EDIT, *OUT, "--frozen_mask={mask}"], 2, "latent grid's size, 16x16 (the image's"),
    ("launch", [*EDIT[1:], *OUT, "--image={large}"], 2, "larger than this model takes"),
    ("launch", [*EDIT, *OUT, "--model={no_vae_config}", "--raft_weights={raft}"], 2,
     "no vae/config.json"),
    ("launch", [*EDIT, *OUT, "--model={bad_unet_config}", "--raft_weights={raft}"], 2,
     "not a readable UNet config"),
    ("launch", [*EDIT, *OUT, "--frozen_mask={corrupt_pth}"], 2, "not a readable PyTorch"),
    ("launch", [*EDIT, *OUT, "--schedule={short}"], 2, "has 3 entries but there are 2"),
    ("launch", [*EDIT, *OUT, "--schedule={nan_schedule}"], 2, "NaN or inf"),
    ("launch", [*EDIT, *OUT, "--schedule={pickled}"], 2, "holds object data"),
    ("launch", [*EDIT, *OUT, "--motion=translate:-500,0"], 2, "out of the frame"),
    ("launch", [*EDIT, *OUT, "--motion=translate:-500,0", "--frozen_mask=none"], 2,
     "out of the frame"),
    ("launch", [*EDIT, *OUT, "--motion=translate:-500,0", "--frozen_mask={frozen_ok}"], 2,
     "out of the frame"),
    ("launch", [*EDIT, *OUT, "--frozen_mask={frozen_ch3}"], 2,
     "frozen mask has shape (1, 3, 16, 16); give (1, 4, 16, 16)"),
    ("launch", [*EDIT, *OUT, "--frozen_mask={frozen_b2}"], 2, "frozen mask has shape (2, 4, 16"),
    ("launch", [*EDIT, *OUT, "--frozen_mask={frozen_rank5}"], 2, "frozen mask has shape (1, 1, 4"),
    # sizes of the work: bounded by what the model and the sampler take
    ("launch", [*EDIT, *OUT, "--steps=1001"], 2, "steps must be from 1 to 1000"),
    ("launch", [*EDIT, *OUT, "--seed=18446744073709551616"], 2,
     "seed must be from 0 to 4294967295"),
    ("launch", [*EDIT, *OUT, "--seed=-1"], 2, "seed must be >= 0"),
    ("launch", [*EDIT, *OUT, "--seed=4294967295", "--num_samples=2"], 2,
     "uses seeds up to 4294967296"),
    ("launch", [*EDIT, *OUT, "--mask_grow=1000000000"], 2, "mask_grow must be from 0 to 4096"),
    ("launch", [*EDIT, *OUT, "--dilate=1000000000"], 2, "dilate must be from 0 to 512"),
    ("launch", [*EDIT, *OUT, "--paste_band=100000"], 2, "paste_band must be from 0 to 512"),
    ("launch", [*EDIT, *OUT, "--raft_iters=1000000"], 2, "raft_iters must be from 1 to 100"),
    ("launch", [*EDIT, *OUT, "--num_samples=100000000"], 2, "num_samples must be from 1 to 64"),
    ("launch", [*EDIT, *OUT, "--chunk=100000"], 2, "chunk must be from 1 to 1000"),
    ("launch", [*EDIT, *OUT, "--recursive_steps=1000"], 2, "recursive_steps must be from 1 to"),
    ("launch", [*EDIT, *OUT, "--recursive_phases=99999999999999999999"], 2,
     "every K must be from 1 to 100"),
    ("launch", [*EDIT, *OUT, "--guide_every=1000000"], 2, "guide_every must be from 1 to 1000"),
    ("launch", [*EDIT, *OUT, "--guidance_weight=1" + "0" * 400], 2,
     "guidance_weight must be a finite number"),
    # values the flag parser refuses
    ("launch", [*EDIT, *OUT, "--steps=1.5"], 2, "flag --steps=1.5: invalid literal"),
    ("launch", [*EDIT, *OUT, "--steps=1e12"], 2, "flag --steps=1e12"),
    ("launch", [*EDIT, *OUT, "--preset=nope"], 2, "flag --preset=nope: value should be one of"),
    ("launch", [*EDIT, *OUT, "--no_such_flag=1"], 2, "Unknown command line flag 'no_such_flag'"),
    # the RAFT file is read before Stable Diffusion loads
    ("launch", [*EDIT, *OUT, "--raft_weights={text}"], 2, "not a PyTorch checkpoint"),
    ("launch", [*EDIT, "--out_dir={ours_link}", "--overwrite"], 2, "is a symbolic link"),
    ("launch", [*EDIT, "--out_dir={ours_link}/", "--overwrite"], 2, "is a symbolic link"),
    # --jobs: problems of the whole run (a bad line is a job's problem, reported in the summary)
    ("launch", [*OUT, "--jobs={work}/none.jsonl"], 2, "cannot read it"),
    ("launch", [*OUT, "--jobs={empty_jobs}"], 2, "no jobs in it"),
    ("launch", [*OUT, "--jobs={jobs}", "--num_samples=2"], 2, "does not apply to --jobs"),
    ("launch", [*OUT, "--jobs={jobs}", "--batch_size=-1"], 2, "batch_size must be >= 1"),
    ("launch", ["--jobs={jobs}", "--out_dir={foreign}"], 2, "was not written by mgjax"),
    ("launch", ["--jobs={jobs}", "--out_dir={file}"], 2, "is a file"),
    # flow.convert
    ("convert", ["{work}/none.pth", "{work}/w.mgjax"], 2, "no such file"),
    ("convert", ["{truncated}", "{work}/w.mgjax"], 2, "not a readable PyTorch checkpoint"),
    ("convert", ["{exploit}", "{work}/w.mgjax"], 2, "pickled code"),
    ("convert", ["{expanded}", "{work}/w.mgjax"], 2, "repeats its storage"),
    ("convert", ["{unknown}", "{work}/w.mgjax"], 2, "unknown checkpoint layout"),
    ("convert", ["{text}", "{work}/w.mgjax"], 2, "not a PyTorch checkpoint"),
    ("convert", ["{raft_pth}", "{work}/none/w.mgjax"], 2, "does not exist"),
    # flow.estimate
    ("estimate", ["--weights={raft}", "--image1={bomb}", "--image2={demo}", "--out={work}/f.npy"],
     2, "pixels allowed"),
    ("estimate", ["--weights={raft}", "--image1={gray}", "--image2={demo}", "--out={work}/f.npy"],
     2, "1 channel(s) (L)"),
    ("estimate", ["--weights={exploit}", "--image1={demo}", "--image2={demo}",
                  "--out={work}/f.npy"], 2, "pickled code"),
    ("estimate", ["--weights={raft}", "--image1={demo}", "--image2={odd}", "--out={work}/f.npy"],
     2, "same shape"),
    # mgjax.evaluation.evaluate
    ("evaluate", ["{work}/none", "--no_clip"], 2, "no"),
    ("evaluate", ["{bad_config_run}", "--no_clip"], 2, "config.json"),
    ("evaluate", ["{pickled_target_run}", "--no_clip", "--raft_weights={raft}"], 2, "object data"),
    # mgjax.evaluation.dragbench
    ("dragbench", ["{work}/none", "--jobs={work}/j.jsonl"], 2, "no such folder"),
    # mgjax.toy.train_raft, mgjax.toy.train_ldm: refused before the output folder exists
    ("train_raft", ["--out_dir={work}/out", "--local_share=1.5"], 2, "give a share from 0 to 1"),
    ("train_raft", ["--out_dir={work}/out", "--init={text}"], 2, "--init: "),
    ("train_raft", ["--out_dir={work}/out", "--init={work}/none.mgjax"], 2, "no such weights"),
    ("train_raft", ["--out_dir={work}/out", "--autoencoder={work}/none"], 2,
     "no diffusers AutoencoderKL folder"),
    ("train_raft", ["--out_dir={work}/out", "--input_scale=3"], 2, "--input_scale 3: give 1, 2"),
    ("train_ldm", ["--out_dir={work}/out", "--init={work}/none"], 2, "no such folder"),
    ("train_ldm", ["--out_dir={work}/out", "--init={text}"], 2, "no such folder"),
    ("train_ldm", ["--out_dir={work}/out", "--init={no_vae_config}"], 2, "subfolder; a diffusers"),
    ("train_ldm", ["--out_dir={work}/out", "--init={bad_config_run}"], 2,
     "not a diffusers AutoencoderKL folder"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_object_weight=0"], 2, "give a weight above 0"),
    ("train_ldm", ["--out_dir={work}/out", "--vae_hard_share=nan"], 2, "give a share from 0 to 1"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_object_weight=nan"], 2, "give a weight above 0"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_layers=0"], 2, "give at least 1 layer"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_swap_weight=-1"], 2, "weight of 0 or more"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_swap_margin=0"], 2, "margin above 0"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_t_range=600,100"], 2, "give LOW,HIGH"),
    ("train_ldm", ["--out_dir={work}/out", "--unet_pixel_weight=nan"], 2, "weight of 0 or more"),
    ("train_ldm", ["--out_dir={work}/out", "--vae_scale_weight=-0.5"], 2, "weight of 0 or more"),
]  # fmt: skip


def _numeric_flags(module: str) -> list[tuple[str, str]]:
    """(name, "integer" or "float") of every number flag a training script defines, read from
    its source: each is checked below, so a flag added later is checked too."""
    import ast

    tree = ast.parse((ROOT / (module.replace(".", "/") + ".py")).read_text())
    return [
        (node.args[0].value, node.func.attr.removeprefix("DEFINE_"))
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("DEFINE_integer", "DEFINE_float")
    ]


# every number a training script takes, out of range (integers -1, floats NaN): refused naming it
for _command, _module in (
    ("train_ldm", "mgjax.toy.train_ldm"),
    ("train_raft", "mgjax.toy.train_raft"),
):
    for _name, _kind in _numeric_flags(_module):
        _bad = "-1" if _kind == "integer" else "nan"
        CASES.append((_command, ["--out_dir={work}/out", f"--{_name}={_bad}"], 2, f"--{_name} "))


def _write_assets(folder: Path) -> dict[str, str]:
    """Files for the cases: valid ones from the toy pack, and hostile ones made here."""
    a = {k: str(v) for k, v in pack.demo_files().items() if k in ("image", "object_mask")}
    a = {"demo": a["image"], "mask": a["object_mask"], "raft": pack.raft_file()}

    def put(name, write):
        path = folder / name
        write(path)
        a[name.split(".")[0]] = str(path)

    put("bomb.png", lambda p: p.write_bytes(png_declaring(30000, 30000)))
    put("odd.png", lambda p: Image.fromarray(np.zeros((64, 70, 3), np.uint8)).save(p))
    put("tiny.png", lambda p: Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(p))
    put("gray.png", lambda p: Image.fromarray(np.zeros((64, 64), np.uint8)).save(p))
    put("text.txt", lambda p: p.write_text("not an image, a flow or a checkpoint"))
    put("small_mask.png", lambda p: Image.fromarray(np.full((32, 32), 255, np.uint8)).save(p))
    put("empty_mask.png", lambda p: Image.fromarray(np.zeros((64, 64), np.uint8)).save(p))
    put("pickled.npy", lambda p: np.save(p, np.array([{"a": 1}], object), allow_pickle=True))
    put("flow_small.npy", lambda p: np.save(p, np.zeros((10, 10, 2), np.float32)))
    put("flow_nan.npy", lambda p: np.save(p, np.full((64, 64, 2), np.nan, np.float32)))
    put("frozen_small.npy", lambda p: np.save(p, np.zeros((1, 4, 3, 3), bool)))
    put("frozen_ok.npy", lambda p: np.save(p, np.zeros((1, 4, 16, 16), bool)))
    put("frozen_ch3.npy", lambda p: np.save(p, np.zeros((1, 3, 16, 16), bool)))
    put("frozen_b2.npy", lambda p: np.save(p, np.zeros((2, 4, 16, 16), bool)))
    put("frozen_rank5.npy", lambda p: np.save(p, np.zeros((1, 1, 4, 16, 16), bool)))
    put("corrupt_pth.pth", lambda p: p.write_bytes(b"PK\x03\x04 not really a zip"))
    put("short.npy", lambda p: np.save(p, np.ones(3, np.float32)))
    put("nan_schedule.npy", lambda p: np.save(p, np.full(2, np.nan, np.float32)))
    put("file", lambda p: p.write_text("a file"))
    put("empty_jobs.jsonl", lambda p: p.write_text("\n# nothing\n"))
    put("jobs.jsonl", lambda p: p.write_text('{"name": "a"}\n'))
    data = torch.zeros(1).expand(10**9)
    put("expanded.pth", lambda p: torch.save({"w": data}, p))
    put("unknown.pth", lambda p: torch.save({"foo.weight": torch.zeros(4, 3)}, p))
    put("truncated.pth", lambda p: p.write_bytes(Path(folder / "unknown.pth").read_bytes()[:99]))
    state = random_torchvision_raft(small=True, seed=1).state_dict()
    put("raft_pth.pth", lambda p: torch.save(state, p))
    put("exploit.pth", lambda p: torch.save(_Exploit(f"touch {folder / 'PWNED'}"), p))
    foreign = folder / "foreign"  # somebody's folder
    (foreign / "photos").mkdir(parents=True)
    (foreign / "precious.txt").write_text("keep")
    a["foreign"] = str(foreign)
    ours = folder / "ours"  # a run mgjax wrote, reached through a link
    ours.mkdir()
    (ours / ".mgjax-run.json").write_text('{"written_by": "mgjax", "digest": null}')
    (ours / "precious.txt").write_text("keep")
    (folder / "ours_link").symlink_to(ours, target_is_directory=True)
    a["ours_link"] = str(folder / "ours_link")
    shutil.copytree(pack.sd_folder(), folder / "no_tokenizer")
    shutil.rmtree(folder / "no_tokenizer" / "tokenizer")
    a["no_tokenizer"] = str(folder / "no_tokenizer")
    put("large.png", lambda p: Image.fromarray(np.zeros((2048, 2048, 3), np.uint8)).save(p))
    sd = Path(pack.sd_folder())
    for name in ("no_vae_config", "bad_unet_config"):
        for part in ("vae", "unet"):
            (folder / name / part).mkdir(parents=True)
        a[name] = str(folder / name)
    shutil.copy(sd / "unet" / "config.json", folder / "no_vae_config" / "unet")
    shutil.copy(sd / "vae" / "config.json", folder / "bad_unet_config" / "vae")
    (folder / "bad_unet_config" / "unet" / "config.json").write_text("{not json")
    bad = folder / "bad_config_run" / "sample_00"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{not json")
    for name in ("source.png", "edited.png"):
        shutil.copy(a["demo"], bad / name)
    np.save(bad / "target_flow.npy", np.zeros((64, 64, 2), np.float32))
    a["bad_config_run"] = str(folder / "bad_config_run")
    pickled = folder / "pickled_target_run" / "sample_00"
    shutil.copytree(bad, pickled)
    (pickled / "config.json").write_text("{}")
    shutil.copy(a["pickled"], pickled / "target_flow.npy")
    a["pickled_target_run"] = str(folder / "pickled_target_run")
    return a


class _Exploit:
    """Pickles as a call to os.system: plain pickle would run the command when loading it."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
def test_every_command_line_refuses_bad_input_in_one_line(tmp_path):
    assets_dir = tmp_path / "assets"
    assets_dir.mkdir()
    assets = _write_assets(assets_dir)
    before = _tree(assets_dir)
    by_command: dict[str, list] = {}
    for n, (command, args, code, words) in enumerate(CASES):
        work = tmp_path / f"case{n:03d}"
        work.mkdir()
        filled = [arg.format(work=work, **assets) for arg in args]
        by_command.setdefault(command, []).append((n, filled, code, words, work))
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")  # never the network
    failures, seconds = [], {}
    for command, cases in by_command.items():
        stdin = json.dumps([{"args": args, "work": str(work)} for _, args, _, _, work in cases])
        proc = subprocess.run(
            [sys.executable, "-m", "tests.cli_runner", command],
            input=stdin, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for (n, args, code, words, _), got in zip(cases, results, strict=True):
            seconds[n] = got["seconds"]
            lines = got["stderr"].strip().splitlines()
            ok = (
                got["code"] == code
                and len(lines) == 1
                and lines[0].startswith("error: ")
                and words in lines[0]
                and "Traceback" not in got["stderr"]
                and got["written"] == []
            )
            if not ok:
                failures.append(f"case {n} {command} {args}: {got}")
    assert not failures, "\n".join(failures)
    assert _tree(assets_dir) == before  # nobody's files touched, no exploit ran
    assert len(CASES) >= 60
    slowest = sorted(seconds.items(), key=lambda item: -item[1])[:3]
    print("slowest cases (s):", [(n, round(s, 2)) for n, s in slowest])  # the first imports

"""launch.py end to end on tiny random models: outputs, resume, and bad input."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow.errors import InputError
from mgjax import config as C
from mgjax.edit import outputs
from mgjax.edit.workflow import resolve_toy, run
from mgjax.model import sd as sdm
from tests.hostile import png_declaring
from tests.tiny_models import tiny
from tests.torch_raft import image_pair, random_torchvision_raft

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128  # tiny VAE factor 4: latents 4x32x32
FAST = dict(steps=4, recursive_steps=2, chunk=2, guidance_weight=30.0, clip=10.0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch")
    sdm.save(tiny(seed=1), folder / "sd")
    torch.save(random_torchvision_raft(small=True, seed=2).state_dict(), folder / "raft.pth")
    a, _ = image_pair(1, SIZE, SIZE, seed=4)
    Image.fromarray(np.round(a[0]).astype(np.uint8)).save(folder / "image.png")
    Image.fromarray(np.zeros((SIZE, 100, 3), np.uint8)).save(folder / "odd.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[40:90, 30:80] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    return folder


def _options(assets, out, **kw):
    base = dict(
        out_dir=str(out),
        raft_weights=str(assets / "raft.pth"),
        model=str(assets / "sd"),
        image=str(assets / "image.png"),
        motion="translate:8,0",
        object_mask=str(assets / "mask.png"),
        **FAST,
    )
    return C.make(**(base | kw))


@pytest.mark.slow
def test_end_to_end_cli_run_writes_every_output(assets, tmp_path):
    out = tmp_path / "edit"
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        f"--out_dir={out}",
        f"--raft_weights={assets / 'raft.pth'}",
        f"--model={assets / 'sd'}",
        f"--image={assets / 'image.png'}",
        "--motion=rotate:20+translate:6,0",
        f"--object_mask={assets / 'mask.png'}",
        "--steps=4",
        "--recursive_steps=2",
        "--chunk=2",
        "--guidance_weight=30",
        "--clip=10",
        "--log_every=2",
        "--num_samples=2",
        "--attention=memory_efficient",
        "--preserve_weight=5",
        f"--compilation_cache={tmp_path / 'xla'}",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "evals/s" in res.stdout and "ETA" in res.stdout and "compiled" in res.stdout
    for n in range(2):
        folder = out / f"sample_{n:02d}"
        for name in ("edited.png", "source.png", "target_flow.png", "achieved_flow.png"):
            assert Image.open(folder / name).size == (SIZE, SIZE), name
        view = SIZE * outputs.view_zoom(SIZE)  # a 128 px image is shown 2x
        assert Image.open(folder / "panel.png").size == (5 * view, view + 14)
        gif = Image.open(folder / "toggle.gif")
        assert gif.n_frames == 2 and gif.size == (view, view)
        assert Image.open(folder / "losses.png").size == (640, 420)
        metrics = json.loads((folder / "metrics.json").read_text())
        for key in (
            "flow_epe_inside_object",
            "flow_epe_outside_object",
            "color_loss_final",
            "keep_loss_final",  # --preserve_weight adds the preservation term
            "guided_evaluations",
            "wall_seconds",
            "compile_seconds",
        ):
            assert key in metrics, key
        assert metrics["guided_evaluations"] == 8 and metrics["unguided_evaluations"] == 0
        assert metrics["loops"] == "unrolled"  # --loops auto on CPU
        config = json.loads((folder / "config.json").read_text())
        assert config["sample_seed"] == n and config["motion"] == "rotate:20+translate:6,0"
        assert "jax" in config["versions"]
        assert sorted(os.listdir(folder / "snapshots")) == ["x0_step0000.png", "x0_step0002.png"]
        assert config["attention"] == "memory_efficient" and config["remat"] == "none"
    a = np.asarray(Image.open(out / "sample_00" / "edited.png"))
    b = np.asarray(Image.open(out / "sample_01" / "edited.png"))
    assert np.abs(a.astype(int) - b).max() > 0  # two samples, two seeds
    assert any((tmp_path / "xla").iterdir())  # compiled chunks went to the persistent cache


@pytest.mark.slow
def test_resume_equals_uninterrupted(assets, tmp_path, monkeypatch):
    """Interrupted before its first checkpoint (after the source was inverted), then after one
    chunk, then the disk fills while the outputs are written: each --resume continues, to the
    uninterrupted run's image; the messages say what is on disk and what to do."""
    from mgjax.method import loop

    whole = run(_options(assets, tmp_path / "whole"), log=lambda s: None)
    cut, lines = tmp_path / "cut", []

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(loop, "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(_options(assets, cut), log=lines.append)
    assert "before the first checkpoint; rerun with --resume" in lines[-1], lines
    assert sorted(os.listdir(cut)) == [".mgjax-run.json", "source.npz"]
    with pytest.raises(KeyboardInterrupt):
        run(_options(assets, cut, resume=True, stop_after_chunks=1), log=lines.append)
    assert "checkpoint at DDIM step 2" in lines[-1], lines
    assert not (cut / "sample_00").exists()  # nothing half-written
    real_replace = os.replace

    def disk_full(src, dst):  # the disk fills up while the outputs are written
        if str(dst).endswith("edited.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", disk_full)
        with pytest.raises(InputError, match=r"edited.png: cannot write it \(No space left"):
            run(_options(assets, cut, resume=True), log=lambda s: None)
    assert not list(cut.rglob(".tmp-*"))  # no temporary file left behind
    run(_options(assets, cut, resume=True), log=lambda s: None)  # space freed: it completes
    a = np.asarray(Image.open(Path(whole) / "sample_00" / "edited.png"))
    b = np.asarray(Image.open(tmp_path / "cut" / "sample_00" / "edited.png"))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InputError, match="settings differ"):
        run(_options(assets, tmp_path / "cut", resume=True, seed=3), log=lambda s: None)


def test_runs_in_one_process_reuse_the_models_and_their_programs(assets, tmp_path, monkeypatch):
    """A later run() with the same model settings and unchanged weight files loads no model
    and traces no program again, and gives the first run's image; a rewritten weights file is
    loaded again, and release() forgets what was kept."""
    import shutil

    from mgjax.edit import workflow

    loads = []
    load = workflow.load_models
    monkeypatch.setattr(workflow, "load_models", lambda c: loads.append(1) or load(c))
    shutil.copy(assets / "raft.pth", tmp_path / "raft.pth")
    options = lambda name: _options(
        assets, tmp_path / name, raft_weights=str(tmp_path / "raft.pth")
    )  # noqa: E731
    workflow.release()
    first = run(options("a"), log=lambda s: None)
    models, sampler = workflow.kept_models(options("a")), workflow.kept_sampler(options("a"))
    traces = sampler.traces
    second = run(options("b"), log=lambda s: None)
    assert len(loads) == 1 and workflow.kept_sampler(options("b")) is sampler
    assert sampler.traces == traces
    image = lambda run_dir: (Path(run_dir) / "sample_00" / "edited.png").read_bytes()  # noqa: E731
    assert image(second) == image(first)
    stat = os.stat(tmp_path / "raft.pth")
    os.utime(tmp_path / "raft.pth", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert workflow.kept_models(options("c")) is not models
    assert len(loads) == 2 and workflow.kept_sampler(options("c")) is not sampler
    workflow.release()
    assert workflow._kept == {}


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(image="missing.png"), "no such image file"),
        (dict(raft_weights="nope.pth"), "raft-things.pth"),
        (dict(motion="spin:3"), "unknown motion 'spin'"),
        (dict(motion=None), "no motion"),
        (dict(motion=None, drag="1,2>3"), "is not 'x,y>X,Y'"),
        (dict(drag="1,2>3,4"), "not --motion and --drag"),
        (dict(image=None, prompt=""), "no source"),
        (dict(resume=True), "holds no run of mgjax.s to continue"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(remat="some"), "remat must be one of none, dots, full, blocks"),
        (dict(attention="flash"), "attention must be one of plain, memory_efficient"),
        (dict(preserve_weight=-1.0), "preserve_weight must be >= 0"),
        (dict(preserve_ramp=float("inf")), "preserve_ramp must be >= 0"),
        (dict(paste_band=-1), "paste_band must be >= 0"),
        (dict(guidance_weight=float("nan")), "guidance_weight must be a finite number"),
        (dict(out_dir="{mine}"), "was not written by mgjax; give a new --out_dir"),
        (dict(out_dir="{mine}", overwrite=True), "--overwrite replaces only mgjax's own"),
        (dict(out_dir="{file}/o"), "is a file, not a folder"),
        (dict(out_dir="{file}"), "is a file; give the path of a folder"),
    ],
)
def test_bad_options_fail_before_loading(assets, tmp_path, change, message):
    """Each mistake is one InputError before any model loads; nothing is written, and a
    folder mgjax did not write is left as it was."""
    if change.get("image") == "missing.png":
        change = dict(change, image=str(tmp_path / "missing.png"))
    mine = tmp_path / "mine"  # somebody's folder
    (mine / "photos").mkdir(parents=True)
    (mine / "precious.txt").write_text("keep")
    (tmp_path / "file").write_text("a file")
    if "out_dir" in change:
        where = dict(mine=mine, file=tmp_path / "file")
        change = dict(change, out_dir=change["out_dir"].format(**where))
    with pytest.raises(ValueError, match=message):  # InputError is a ValueError
        run(_options(assets, tmp_path / "o", **change), log=lambda s: None)
    assert not (tmp_path / "o").exists()
    assert sorted(os.listdir(mine)) == ["photos", "precious.txt"]
    assert (tmp_path / "file").read_text() == "a file"


def test_real_image_is_inverted_with_its_prompt_without_cfg(assets, tmp_path, monkeypatch):
    """Plain DDIM inversion: the prompt's embedding and CFG scale 1, whatever --cfg_scale the
    sampling uses (with prompt "" this is the reference's unconditional inversion)."""
    from mgjax.method import source as src_lib

    seen = {}

    class Stop(Exception):
        pass

    def invert(sd, images, cond, uncond, num_steps, cfg_scale, **kw):
        seen.update(sd=sd, cond=np.asarray(cond), uncond=np.asarray(uncond), cfg=cfg_scale)
        raise Stop

    monkeypatch.setattr(src_lib, "invert", invert)
    with pytest.raises(Stop):
        run(_options(assets, tmp_path / "o", prompt="a red square"), log=lambda s: None)
    sd = seen["sd"]
    np.testing.assert_array_equal(seen["cond"], np.asarray(sd.embed("a red square")))
    np.testing.assert_array_equal(seen["uncond"], np.asarray(sd.embed("")))
    assert np.abs(seen["cond"] - seen["uncond"]).max() > 1e-3  # the prompt made a difference
    assert seen["cfg"] == 1.0


def test_bad_inputs_in_files_fail_before_any_model_work(assets, tmp_path, monkeypatch):
    """Every input file is read and checked against the model's sizes (from its config files)
    before a model loads: with loading made impossible, each mistake is still its InputError."""
    from mgjax.edit import workflow

    def no_models(config):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(workflow, "load_models", no_models)
    with pytest.raises(InputError, match="not a multiple of 32; resize it to 96x128"):
        run(_options(assets, tmp_path / "a", image=str(assets / "odd.png")), log=lambda s: None)
    with pytest.raises(InputError, match="entirely out of the frame"):
        run(_options(assets, tmp_path / "b", motion="translate:-500,0"), log=lambda s: None)
    small = tmp_path / "small.png"
    Image.fromarray(np.ones((64, 64), np.uint8) * 255).save(small)
    with pytest.raises(InputError, match="mask is 64x64 but the image is 128x128"):
        run(_options(assets, tmp_path / "c", object_mask=str(small)), log=lambda s: None)
    bomb = tmp_path / "bomb.png"  # a few dozen bytes declaring 30000x30000 pixels
    bomb.write_bytes(png_declaring(30000, 30000))
    with pytest.raises(InputError, match="declares more than the 67,108,864 pixels allowed"):
        run(_options(assets, tmp_path / "d", image=str(bomb)), log=lambda s: None)
    pickled = tmp_path / "mask.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="holds object data, not numbers"):
        run(_options(assets, tmp_path / "e", object_mask=str(pickled)), log=lambda s: None)
    with pytest.raises(InputError, match="not a readable .npy guidance schedule"):
        run(_options(assets, tmp_path / "f", schedule=str(bomb)), log=lambda s: None)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tiny)
    with pytest.raises(InputError, match="smaller than the 64x64 RAFT needs; resize it to 64x64"):
        run(_options(assets, tmp_path / "g", image=str(tiny)), log=lambda s: None)
    short = tmp_path / "short.npy"
    np.save(short, np.ones(3, np.float32))
    with pytest.raises(InputError, match="has 3 entries but there are 4 DDIM steps"):
        run(_options(assets, tmp_path / "h", schedule=str(short)), log=lambda s: None)
    frozen = tmp_path / "frozen.png"  # at the image's size, not the latent grid's
    Image.fromarray(np.ones((SIZE, SIZE), np.uint8) * 255).save(frozen)
    with pytest.raises(InputError, match="a frozen mask is at the latent grid's size, 32x32"):
        run(_options(assets, tmp_path / "i", frozen_mask=str(frozen)), log=lambda s: None)
    flow = tmp_path / "flow.npy"
    np.save(flow, np.zeros((SIZE, SIZE // 2, 2), np.float32))
    with pytest.raises(InputError, match=r"flow is \(128, 64, 2\) but the image needs"):
        run(_options(assets, tmp_path / "j", motion=None, flow=str(flow)), log=lambda s: None)
    big = tmp_path / "big.png"  # the tiny model's images are 128x128: at most 256 a side
    Image.fromarray(np.zeros((300, 260, 3), np.uint8)).save(big)
    with pytest.raises(InputError, match="260x300 is larger than this model takes"):
        run(_options(assets, tmp_path / "k", image=str(big)), log=lambda s: None)
    for name in "abcdefghijk":
        assert not (tmp_path / name).exists()


def test_more_bad_inputs_fail_before_any_model_work(assets, tmp_path, monkeypatch):
    """A frozen mask's channels, a motion out of the frame with any frozen mask, and a linked
    --out_dir with --overwrite are refused before a model loads; a link is never followed to
    delete."""
    from mgjax.edit import workflow

    def no_models(config):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(workflow, "load_models", no_models)
    quiet = lambda s: None  # noqa: E731
    ch3 = tmp_path / "ch3.npy"  # the latent grid's size, the wrong channel count
    np.save(ch3, np.zeros((1, 3, 32, 32), bool))
    with pytest.raises(InputError, match=r"frozen mask has shape \(1, 3, 32, 32\); give \(1, 4,"):
        run(_options(assets, tmp_path / "a", frozen_mask=str(ch3)), log=quiet)
    ok = tmp_path / "ok.npy"
    np.save(ok, np.zeros((1, 4, 32, 32), bool))
    for frozen in ("none", str(ok)):
        with pytest.raises(InputError, match="entirely out of the frame"):
            run(
                _options(assets, tmp_path / "b", motion="translate:-500,0", frozen_mask=frozen),
                log=quiet,
            )
    ours = tmp_path / "ours"  # a run of mgjax's, reached through a link
    ours.mkdir()
    (ours / ".mgjax-run.json").write_text('{"written_by": "mgjax", "digest": null}')
    (ours / "precious.txt").write_text("keep")
    (tmp_path / "link").symlink_to(ours, target_is_directory=True)
    for out in (tmp_path / "link", f"{tmp_path / 'link'}/"):
        with pytest.raises(InputError, match="is a symbolic link; --overwrite replaces only"):
            run(_options(assets, out, overwrite=True), log=quiet)
    assert sorted(os.listdir(ours)) == [".mgjax-run.json", "precious.txt"]
    assert (tmp_path / "link").is_symlink()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_raft_weights_are_checked_before_stable_diffusion_loads(assets, tmp_path, monkeypatch):
    from mgjax.edit import workflow

    def no_sd(*a, **kw):
        raise AssertionError("Stable Diffusion was loaded before the RAFT weights were read")

    monkeypatch.setattr(sdm, "load", no_sd)
    bad = tmp_path / "garbage.pth"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        workflow.load_models(_options(assets, tmp_path / "o", raft_weights=str(bad)))
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        run(_options(assets, tmp_path / "o", raft_weights=str(bad)), log=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_a_crash_after_the_folder_is_written_keeps_it_for_resume(assets, tmp_path, monkeypatch):
    """An error that is no input's fault (every bad input is refused before the folder is
    written) keeps what was computed, as an interruption does, and says how to continue."""
    from mgjax.edit import workflow

    def crash(*a, **kw):
        raise RuntimeError("device lost")

    monkeypatch.setattr(workflow, "start", crash)
    lines = []
    with pytest.raises(RuntimeError, match="device lost"):
        run(_options(assets, tmp_path / "o"), log=lines.append)
    assert "rerun with --resume to continue it" in lines[-1]
    assert os.path.isfile(tmp_path / "o" / ".mgjax-run.json")


def test_flag_values_the_parser_refuses_are_bad_input(tmp_path):
    """A value absl cannot parse, an unknown choice or flag: one error line and exit status 2,
    as for every bad input."""
    for arg, words in (
        ("--steps=1.5", "error: flag --steps=1.5: invalid literal for int()"),
        ("--preset=nope", "error: flag --preset=nope: value should be one of"),
        ("--no_such_flag", "error: Unknown command line flag 'no_such_flag'"),
    ):
        res = subprocess.run(
            [sys.executable, str(ROOT / "launch.py"), arg, f"--out_dir={tmp_path / 'o'}"],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(words), res.stderr
    assert not (tmp_path / "o").exists()


def test_resize_fits_an_image_to_the_model():
    """--resize: an image over twice the model's side is scaled to that side on its longer
    side, keeping its aspect, then rounded to multiples of the factor."""
    from mgjax.edit.readers import fit_image

    wide = np.random.default_rng(0).random((1, 500, 1000, 3)).astype(np.float32)
    assert fit_image(wide, 32, True, "x", native=128).shape == (1, 64, 128, 3)
    assert fit_image(wide, 32, True, "x", native=512).shape == (1, 512, 992, 3)  # not over 2x
    with pytest.raises(InputError, match="pass --resize to fit its longer side to 128"):
        fit_image(wide, 32, False, "x", native=128)


def test_the_last_checked_input_fails_before_diffusers_is_imported(tmp_path):
    """The toy pack's demo with a guidance schedule of the wrong length (the last input file
    checked): exit 2 with its one line, and neither diffusers nor the sampler was even
    imported, so no model can have been loaded, run or compiled."""
    short = tmp_path / "short.npy"
    np.save(short, np.ones(3, np.float32))
    code = (
        "import sys, launch\nsys.argv = ['launch.py', '--out_dir=o']\n"
        f"launch.FLAGS(['launch', '--out_dir={tmp_path / 'o'}', '--schedule={short}'])\n"
        "try:\n    launch.main(['launch'])\nexcept SystemExit as e:\n    print('exit', e.code)\n"
        "print('imported', [m for m in ('diffusers', 'transformers', 'mgjax.model.sd',"
        " 'mgjax.method.sampler') if m in sys.modules])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert "exit 2" in done.stdout and "imported []" in done.stdout, done.stdout + done.stderr
    assert "has 3 entries but there are 100 DDIM steps" in done.stderr, done.stderr
    assert not (tmp_path / "o").exists()


def test_cli_errors_are_one_line(assets, tmp_path):
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / ".mgjax-run.json").write_text("{}")  # a folder mgjax wrote
    cmd = [
        sys.executable,
        str(ROOT / "launch.py"),
        f"--out_dir={tmp_path / 'exists'}",
        f"--raft_weights={assets / 'raft.pth'}",
        f"--image={assets / 'image.png'}",
        "--motion=translate:1,0",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'exists'} exists; pass --resume to continue it or --overwrite "
        "to replace it"
    ]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_reference_data_folder_source(assets, tmp_path):
    """--data_dir in the authors' format: its latents, flow, frozen mask and schedule are used."""
    data = tmp_path / "example"
    (data / "latents").mkdir(parents=True)
    (data / "flows").mkdir()
    rng = np.random.default_rng(0)
    Image.open(assets / "image.png").save(data / "pred.png")
    torch.save(
        torch.from_numpy(rng.standard_normal((1, 4, 32, 32)).astype(np.float32)),
        data / "start_zt.pth",
    )
    for i in range(4):
        z = rng.standard_normal((1, 4, 32, 32)).astype(np.float32)
        torch.save(torch.from_numpy(z), data / "latents" / f"zt.{i:05}.pth")
    flow = torch.zeros(1, 2, SIZE, SIZE)
    flow[0, 0, 40:90, 30:80] = 6.0
    torch.save(flow, data / "flows" / "right.pth")
    frozen = torch.ones(1, 4, 32, 32, dtype=torch.bool)
    frozen[..., 8:24, 6:24] = False
    torch.save(frozen, data / "flows" / "right.mask.pth")
    np.save(data / "guidance_schedule.npy", np.linspace(1.0, 0.5, 4))
    opts = _options(
        assets,
        tmp_path / "out",
        image=None,
        motion=None,
        object_mask=None,
        data_dir=str(data),
        target_flow_name="right.pth",
        edit_mask_name="right.mask.pth",
    )
    run(opts, log=lambda s: None)
    folder = tmp_path / "out" / "sample_00"
    assert Image.open(folder / "edited.png").size == (SIZE, SIZE)
    np.testing.assert_array_equal(
        np.asarray(Image.open(folder / "source.png")), np.asarray(Image.open(data / "pred.png"))
    )
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["guided_evaluations"] == 8


def test_toy_model_resolves_to_the_pack_and_its_demo(tmp_path, monkeypatch):
    from mgjax.toy import pack

    monkeypatch.setattr(pack, "PACK", tmp_path / "pack")
    with pytest.raises(InputError, match="no toy pack"):
        resolve_toy(C.make(out_dir=str(tmp_path / "o"), model="toy"))
    (tmp_path / "pack").mkdir()
    demo = {"prompt": "a red square on a striped blue background", "motion": "translate:10,0"}
    (tmp_path / "pack" / "pack.json").write_text(json.dumps({"demo": demo}))
    o = C.flat(resolve_toy(C.make(out_dir=str(tmp_path / "o"), model="toy")))
    assert (o["model"], o["revision"]) == (str(tmp_path / "pack" / "sd"), None)
    assert o["raft_weights"] == str(tmp_path / "pack" / "raft-small.mgjax")
    assert o["image"] == str(tmp_path / "pack" / "demo.png") and o["motion"] == demo["motion"]
    assert o["object_mask"] == str(tmp_path / "pack" / "demo_mask.png")
    assert o["prompt"] == demo["prompt"]
    own = C.flat(
        resolve_toy(
            C.make(out_dir="o", model="toy", image="mine.png", motion="rotate:5", raft_weights="r")
        )
    )  # a source or motion of one's own: no demo, and one's own RAFT wins
    assert (own["image"], own["motion"], own["object_mask"], own["raft_weights"]) == (
        "mine.png", "rotate:5", None, "r"
    )  # fmt: skip
    real = C.make(out_dir="o", model="CompVis/stable-diffusion-v1-4")
    assert resolve_toy(real) is real


def _faulty_run(phase: str, flags: list[str], delay: float = 0.0, count: int = 0):
    cmd = [sys.executable, "-m", "tests.fault_runner", phase, str(delay), str(count), "--"]
    return subprocess.run(cmd + flags, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_run_killed_anywhere_resumes_to_the_same_image(assets, tmp_path):
    """SIGKILL (no clean-up of any kind) at a random point of each phase in turn: the source's
    DDIM inversion, then, resumed, the compilation, then the sampling, then the writing of the
    outputs. The last --resume completes the run; its image equals the uninterrupted run's byte
    for byte, and nothing temporary is left."""
    import random

    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    flags = [
        f"--raft_weights={assets / 'raft.pth'}",
        f"--model={assets / 'sd'}",
        f"--image={assets / 'image.png'}",
        f"--object_mask={assets / 'mask.png'}",
        "--motion=translate:8,0",
        f"--compilation_cache={tmp_path / 'xla'}",
        *(f"--{k}={v}" for k, v in FAST.items()),
    ]
    whole = _faulty_run("none", flags + [f"--out_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-2000:]
    seen = json.loads(whole.stdout.strip().splitlines()[-1])
    expected = (tmp_path / "whole" / "sample_00" / "edited.png").read_bytes()
    out, resume = tmp_path / "cut", []
    for phase in ("inversion", "compilation", "sampling", "outputs"):
        delay = rng.uniform(0, seen[phase]) if phase != "outputs" else 0.0
        count = rng.randint(1, seen["output_files"]) if phase == "outputs" else 0
        where = f"{phase} at {delay:.3f} s / file {count} (seed {seed})"
        killed = _faulty_run(phase, flags + [f"--out_dir={out}"] + resume, delay, count)
        assert killed.returncode == -9, (where, killed.stderr[-2000:])  # SIGKILL
        assert phase == "outputs" or not (out / "sample_00" / "edited.png").exists(), where
        resume = ["--resume"]
    resumed = _faulty_run("none", flags + [f"--out_dir={out}", "--resume"])
    assert resumed.returncode == 0, (seed, resumed.stderr[-2000:])
    assert (out / "sample_00" / "edited.png").read_bytes() == expected, seed
    assert not list(out.rglob(".tmp-*")), seed  # the killed writes' leftovers are gone


def test_the_command_line_starts_without_pytorch():
    """launch.py, `python -m mgjax.<command>` and `python -m bench.<name>` mark torch absent
    before diffusers and transformers load (both import it whenever it is installed: seconds of
    every start); the model seam works without it; a process that has torch already, or runs
    with USE_TORCH=1, keeps it, and so does a library user's import of mgjax."""
    entry = "import runpy, sys\nsys.argv = ['launch.py']\n"
    entry += "try:\n    runpy.run_path('launch.py', run_name='__main__')\n"
    entry += "except SystemExit as e:\n    assert not e.code, e.code\n"
    entry += "print('torch:', sys.modules.get('torch', 'absent'))"
    res = subprocess.run([sys.executable, "-c", entry], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.splitlines()[-1] == "torch: None", res.stderr
    seam = "import sys\nfrom mgjax.model import without_torch\nwithout_torch()\n"
    seam += "from tests.tiny_models import tiny\nsd = tiny(seed=0)\n"
    seam += "print(sd.embed('a ball').shape, sys.modules.get('torch', 'absent') is None)"
    res = subprocess.run([sys.executable, "-c", seam], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.split()[-1] == "True", res.stderr[-2000:]
    # Python sets sys.argv[0] to "-m" while it locates `python -m package.module`
    check = "import sys\n{first}sys.argv[0] = {argv0!r}\n"
    check += "sys.orig_argv = [sys.executable, {argv0!r}, {module!r}]\nimport {package}\n"
    check += "print(sys.modules.get('torch', 'absent') is None)"
    mg, toy, peer = "mgjax.evaluation.evaluate", "bench.toy_quality", "bench.raft"
    cases = [("", "-m", mg, {}, "True"), ("", "-m", toy, {}, "True")]
    cases += [("", "-m", peer, {}, "False")]  # a bench that runs a PyTorch peer keeps it
    cases += [("import torch\n", "-m", mg, {}, "False")]
    cases += [("", "-m", mg, {"USE_TORCH": "1"}, "False")]
    cases += [("", "-m", mg, {"USE_TORCH": "0"}, "True")]  # started by a command that did
    cases += [("", "-c", mg, {}, "False")]  # a library user's process
    for first, argv0, module, env, absent in cases:
        package = module.split(".")[0]
        code = check.format(first=first, argv0=argv0, module=module, package=package)
        env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"} | env
        res = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split()[-1] == absent, (first, argv0, module, env, res.stdout)

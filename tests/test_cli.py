"""Command lines (flow.estimate, flow.convert): bad input -> one `error:` line on stderr, exit
status 2, no traceback, nothing written; plus the success path checked against load_raft.

A few cases run as subprocesses (the real entry points); the rest call main() in-process.
"""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flow import convert as convert_cli
from flow import estimate as estimate_cli
from flow.checkpoint import load_raft
from flow.flo import read_flo
from tests.torch_raft import image_pair, random_torchvision_raft

ITERS = 2
SIZE = 128


class _Exploit:
    """Pickles as a call to os.system: loading it with plain pickle would run the command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _save_png(path: Path, array: np.ndarray) -> str:
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, str]:
    """Weights (small RAFT: .pth and converted), images and bad checkpoints, made once."""
    folder = tmp_path_factory.mktemp("cli-assets")
    pth = folder / "raft_small.pth"
    torch.save(random_torchvision_raft(small=True, seed=5).state_dict(), pth)
    convert_cli.convert(str(pth), str(folder / "raft_small.mgjax"))
    a, b = (np.round(x[0]).astype(np.uint8) for x in image_pair(1, SIZE, SIZE, seed=2))
    data = pth.read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 2])
    torch.save({"foo.weight": torch.zeros(4, 3), "foo.bias": torch.zeros(4)}, folder / "foo.pth")
    marker = folder / "PWNED"
    torch.save(_Exploit(f"touch {marker}"), folder / "exploit.pth")
    with zipfile.ZipFile(folder / "exploit.pth") as z:  # the payload really is a system() call
        pickled = b"".join(z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    assert b"system" in pickled and b"touch" in pickled
    return {
        "pth": str(pth),
        "weights": str(folder / "raft_small.mgjax"),
        "truncated": str(folder / "truncated.pth"),
        "foo": str(folder / "foo.pth"),
        "exploit": str(folder / "exploit.pth"),
        "marker": str(marker),
        "im1": _save_png(folder / "im1.png", a),
        "im2": _save_png(folder / "im2.png", b),
        "im130": _save_png(folder / "im130.png", np.zeros((130, SIZE, 3), np.uint8)),
        "im136": _save_png(folder / "im136.png", np.zeros((SIZE, 136, 3), np.uint8)),
        "gray": _save_png(folder / "gray.png", a[..., 0]),
        "rgba": _save_png(folder / "rgba.png", np.dstack([a, a[..., :1]])),
    }


@pytest.fixture(scope="session")
def reference_flow(assets) -> np.ndarray:
    """What the CLI should write: load_raft on the PNGs as read back, eval-mode statistics."""
    im1, im2 = (np.asarray(Image.open(assets[k]), np.float32) for k in ("im1", "im2"))
    net = load_raft(assets["weights"], context_norm="running")
    flow = np.asarray(net(im1[None], im2[None], iters=ITERS)[0])
    assert flow.shape == (SIZE, SIZE, 2) and np.abs(flow).max() > 0.1
    return flow


def _assert_one_error_line(rc: int, err: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > 8, err


def _run(repo_root: str, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _estimate_args(weights: str, im1: str, im2: str, out: Path, viz: Path | None = None):
    args = ["--weights", weights, "--image1", im1, "--image2", im2, "--iters", str(ITERS)]
    args += ["--out", str(out)] + (["--viz", str(viz)] if viz else [])
    return args


def _estimate_in_process(args: list[str]) -> int:
    """flow.estimate's main() on parsed flags; returns the exit status."""
    flags = estimate_cli.FLAGS
    flags.unparse_flags()
    flags(["estimate", *args])
    try:
        estimate_cli.main(["estimate"])
        return 0
    except SystemExit as e:
        return e.code
    finally:
        flags.unparse_flags()


# Subprocesses (each pays for a jax import): the real entry points, 6 runs in all.


@pytest.mark.slow
def test_estimate_subprocess_writes_flow_and_viz(repo_root, assets, reference_flow, tmp_path):
    out, viz = tmp_path / "flow.npy", tmp_path / "flow.png"
    args = _estimate_args(assets["weights"], assets["im1"], assets["im2"], out, viz)
    proc = _run(repo_root, "flow.estimate", *args, "--context_norm", "running")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and str(out) in proc.stdout
    flow = np.load(out)
    assert flow.shape == (SIZE, SIZE, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(flow, reference_flow, rtol=0, atol=1e-4)
    with Image.open(viz) as im:
        assert im.size == (SIZE, SIZE) and im.mode == "RGB"
    assert sorted(os.listdir(tmp_path)) == ["flow.npy", "flow.png"]  # no temp files left


def test_estimate_subprocess_size_not_multiple_of_8(repo_root, assets, tmp_path):
    out, viz = tmp_path / "flow.npy", tmp_path / "flow.png"
    args = _estimate_args(assets["weights"], assets["im130"], assets["im130"], out, viz)
    proc = _run(repo_root, "flow.estimate", *args)
    _assert_one_error_line(proc.returncode, proc.stderr)
    assert "multiples of 8" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_estimate_subprocess_refuses_pickled_code(repo_root, assets, tmp_path):
    out, viz = tmp_path / "flow.npy", tmp_path / "flow.png"
    args = _estimate_args(assets["exploit"], assets["im1"], assets["im2"], out, viz)
    proc = _run(repo_root, "flow.estimate", *args)
    _assert_one_error_line(proc.returncode, proc.stderr)
    assert "pickled code" in proc.stderr
    assert not os.path.exists(assets["marker"])
    assert os.listdir(tmp_path) == []


def test_estimate_subprocess_out_folder_missing(repo_root, assets, tmp_path):
    out, viz = tmp_path / "nope" / "flow.npy", tmp_path / "flow.png"
    args = _estimate_args(assets["weights"], assets["im1"], assets["im2"], out, viz)
    proc = _run(repo_root, "flow.estimate", *args)
    _assert_one_error_line(proc.returncode, proc.stderr)
    assert "does not exist" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_convert_subprocess_truncated(repo_root, assets, tmp_path):
    dst = tmp_path / "w.mgjax"
    proc = _run(repo_root, "flow.convert", assets["truncated"], str(dst))
    _assert_one_error_line(proc.returncode, proc.stderr)
    assert assets["truncated"] in proc.stderr
    assert os.listdir(tmp_path) == []


def test_convert_subprocess_refuses_pickled_code(repo_root, assets, tmp_path):
    dst = tmp_path / "w.mgjax"
    proc = _run(repo_root, "flow.convert", assets["exploit"], str(dst))
    _assert_one_error_line(proc.returncode, proc.stderr)
    assert "pickled code" in proc.stderr
    assert not os.path.exists(assets["marker"])
    assert os.listdir(tmp_path) == []


# In-process: the remaining cases.


def test_estimate_writes_flo(assets, reference_flow, tmp_path, capsys):
    out = tmp_path / "flow.flo"
    args = _estimate_args(assets["weights"], assets["im1"], assets["im2"], out)
    assert _estimate_in_process([*args, "--context_norm", "running"]) == 0
    flow = read_flo(out)
    assert flow.shape == (SIZE, SIZE, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(flow, reference_flow, rtol=0, atol=1e-4)
    assert os.listdir(tmp_path) == ["flow.flo"]
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "weights, im1, im2, out_dir, viz_dir, message",
    [
        ("weights", "im130", "im130", "", "", "multiples of 8"),
        ("weights", "im1", "im136", "", "", "same shape"),
        ("weights", "gray", "im2", "", "", "1 channel(s) (L)"),
        ("weights", "im1", "rgba", "", "", "4 channel(s) (RGBA)"),
        ("foo", "im1", "im2", "", "", "unknown checkpoint layout"),
        ("truncated", "im1", "im2", "", "", "not a readable PyTorch checkpoint"),
        ("exploit", "im1", "im2", "", "", "pickled code"),
        ("missing", "im1", "im2", "", "", "no such weights file"),
        ("weights", "missing", "im2", "", "", "no such image file"),
        ("weights", "im1", "im2", "nope", "", "does not exist"),
        ("weights", "im1", "im2", "", "nope", "does not exist"),
    ],
)
def test_estimate_bad_input(assets, tmp_path, capsys, weights, im1, im2, out_dir, viz_dir, message):
    files = dict(assets, missing=str(tmp_path / "missing.file"))
    out, viz = tmp_path / out_dir / "flow.npy", tmp_path / viz_dir / "flow.png"
    rc = _estimate_in_process(_estimate_args(files[weights], files[im1], files[im2], out, viz))
    captured = capsys.readouterr()
    _assert_one_error_line(rc, captured.err)
    assert message in captured.err
    assert captured.out == ""
    assert os.listdir(tmp_path) == []
    assert not os.path.exists(assets["marker"])


@pytest.mark.parametrize(
    "src, message",
    [
        ("foo", "unknown checkpoint layout"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("exploit", "pickled code"),
        ("missing", "no such file"),
    ],
)
def test_convert_bad_input(assets, tmp_path, capsys, src, message):
    files = dict(assets, missing=str(tmp_path / "missing.pth"))
    dst = tmp_path / "w.mgjax"
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["convert", files[src], str(dst)])
    captured = capsys.readouterr()
    _assert_one_error_line(exit_info.value.code, captured.err)
    assert message in captured.err
    assert os.listdir(tmp_path) == []
    assert not os.path.exists(assets["marker"])


def test_convert_bad_usage_and_dst_folder(assets, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["convert", assets["pth"]])
    _assert_one_error_line(exit_info.value.code, capsys.readouterr().err)
    dst = tmp_path / "nope" / "w.mgjax"
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(["convert", assets["pth"], str(dst)])
    captured = capsys.readouterr()
    _assert_one_error_line(exit_info.value.code, captured.err)
    assert "does not exist" in captured.err
    assert os.listdir(tmp_path) == []

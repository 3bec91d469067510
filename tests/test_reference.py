"""The reference data-folder reader, on folders written by torch.save like the authors' files."""

import numpy as np
import pytest
import torch
from PIL import Image

from flow.errors import InputError
from mgjax.edit.reference import read_reference_folder


def _folder(root, steps=4, h=64):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, h, 3), dtype=np.uint8)).save(root / "pred.png")
    z_T = torch.from_numpy(rng.standard_normal((1, 4, h // 8, h // 8)).astype(np.float32))
    torch.save(z_T, root / "start_zt.pth")
    (root / "latents").mkdir()
    latents = [torch.randn(1, 4, h // 8, h // 8) for _ in range(steps)]
    for i, z in enumerate(latents):
        torch.save(z, root / "latents" / f"zt.{i:05}.pth")
    (root / "flows").mkdir()
    flow = torch.zeros(1, 2, h, h)
    flow[0, 0, 10:20, 10:20] = 5.0
    flow[0, 1, 10:20, 10:20] = -2.0
    torch.save(flow, root / "flows" / "right5.pth")
    mask = torch.ones(1, 4, h // 8, h // 8, dtype=torch.bool)
    mask[..., 1:3, 1:3] = False
    torch.save(mask, root / "flows" / "right5.mask.pth")
    np.save(root / "guidance_schedule.npy", np.linspace(1, 0, steps))
    return z_T.numpy(), np.stack([z.numpy() for z in latents]), flow.numpy(), mask.numpy()


def test_reads_everything_in_our_layouts(tmp_path):
    z_T, latents, flow, mask = _folder(tmp_path)
    data = read_reference_folder(tmp_path, "right5.pth", "right5.mask.pth")
    assert data.source.shape == (1, 64, 64, 3) and 0 <= data.source.min() <= data.source.max() <= 1
    expected = np.asarray(Image.open(tmp_path / "pred.png")).astype(np.float32) / 255.0
    np.testing.assert_array_equal(expected, data.source[0])
    np.testing.assert_array_equal(data.z_T, z_T)
    np.testing.assert_array_equal(data.trajectory, latents)  # (S, 1, 4, h, w), 00000 first
    np.testing.assert_array_equal(data.target_flow, flow.transpose(0, 2, 3, 1))  # NHWC
    assert data.target_flow[0, 15, 15].tolist() == [5.0, -2.0]
    assert data.frozen.dtype == bool
    np.testing.assert_array_equal(data.frozen, mask)
    np.testing.assert_allclose(data.schedule, np.linspace(1, 0, 4))
    short = read_reference_folder(tmp_path, num_steps=2)
    assert short.trajectory.shape[0] == 2 and short.target_flow is None


def test_rejects_bad_folders(tmp_path):
    with pytest.raises(InputError, match="no such data folder"):
        read_reference_folder(tmp_path / "missing")
    with pytest.raises(InputError, match="no pred.png"):
        read_reference_folder(tmp_path)
    _folder(tmp_path)
    with pytest.raises(InputError, match="no nope.pth"):
        read_reference_folder(tmp_path, "nope.pth")
    with pytest.raises(InputError, match="4 cached latents but 10"):
        read_reference_folder(tmp_path, num_steps=10)
    (tmp_path / "latents" / "zt.00002.pth").unlink()
    with pytest.raises(InputError, match="gap-free"):
        read_reference_folder(tmp_path)


def test_refuses_pickled_code(tmp_path):
    _folder(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"flow": Evil()}, tmp_path / "flows" / "evil.pth")
    with pytest.raises(InputError):
        read_reference_folder(tmp_path, "evil.pth")

"""An edit's source: its image, z_T and the latents of the DDIM trajectory the guided sampler
copies its frozen region from, cached in the run's folder (source.npz) so that a resumed run
neither inverts nor generates again."""

import os

import numpy as np

from flow.errors import InputError
from flow.files import NpzFile, read_rgb, write_atomic
from mgjax.config import Config
from mgjax.edit.readers import fit_image

CACHE = "source.npz"


def source_image(config: Config, geometry):
    """(H, W, source image f32[1,H,W,3] in [0, 1] or None when it is generated, the reference
    folder's contents or None); `geometry` is the model's mgjax.model.modelinfo.Geometry."""
    from mgjax.edit.reference import read_reference_folder

    src, factor = config.source, geometry.vae_factor * 8
    if src.data_dir:
        data = read_reference_folder(
            src.data_dir, src.target_flow_name, src.edit_mask_name, config.method.steps
        )
        if data.trajectory is None or data.z_T is None:
            raise InputError(f"{src.data_dir}: needs start_zt.pth and latents/zt.*.pth")
        pred = os.path.join(src.data_dir, "pred.png")
        image = fit_image(data.source, factor, False, pred)
        return image.shape[1], image.shape[2], image, data
    if src.image:
        image = read_rgb(src.image)[None] / 255.0
        image = fit_image(image, factor, src.resize, src.image, geometry.image_size)
        return image.shape[1], image.shape[2], image, None
    return geometry.image_size, geometry.image_size, None, None


def source_trajectory(config: Config, sd, cond, uncond, folder: str, image, data, log):
    """(image f32[1,H,W,3] in [0, 1], z_T f32[1,C,h,w], latents f32[S,1,C,h,w]): the reference
    folder's, a DDIM inversion of the image, or a generation from the prompt; read from
    folder/source.npz when there, written there otherwise."""
    import jax

    from mgjax.method import source as src_lib

    cache = os.path.join(folder, CACHE)
    if os.path.isfile(cache):
        return _read_cache(cache)
    steps = config.method.steps
    if data is not None:
        z_T, latents = data.z_T, data.trajectory
    elif image is not None:
        log(f"inverting {config.source.image} over {steps} DDIM steps ...")
        # with the prompt, no classifier-free guidance: plain DDIM inversion (with prompt "",
        # the reference's setting for real images, the same as unconditional)
        traj = src_lib.invert(sd, image, cond, uncond, steps, 1.0, chunk=50)
        z_T, latents = traj.z_T, traj.latents
    else:
        h = sd.unet.config.sample_size
        key = jax.random.PRNGKey(config.source.seed)
        z_T = np.asarray(jax.random.normal(key, (1, sd.latent_channels, h, h)))
        log(f"generating the source from {config.source.prompt!r}, seed {config.source.seed} ...")
        traj = src_lib.generate(sd, z_T, cond, uncond, steps, config.method.cfg_scale, chunk=50)
        image = np.rint(src_lib.decode_images(sd, traj.z0) * 255.0) / 255.0  # as its PNG holds it
        latents = traj.latents
    image = np.asarray(image, np.float32)
    z_T, latents = np.asarray(z_T, np.float32), np.asarray(latents, np.float32)

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, image=image, z_T=z_T, latents=latents)

    write_atomic(cache, write)
    return image, z_T, latents


_CACHED = {"image": 4, "z_T": 4, "latents": 5}  # array -> its number of dimensions


def _read_cache(path: str):
    """(image, z_T, latents) of a source.npz: exactly those arrays, of real floats with their
    number of dimensions, finite, and no more bytes than the file holds (np.savez stores its
    members uncompressed)."""
    fix = "remove it (or start again with --overwrite)"
    with NpzFile(path, "source cache", fix, max_bytes=os.path.getsize(path)) as z:
        if sorted(z.keys) != sorted(_CACHED):
            raise z.error(f"it holds {sorted(z.keys)}, not {sorted(_CACHED)}")
        out = []
        for key, ndim in _CACHED.items():
            value = z.read(key, lambda s, d, n=ndim: None if len(s) == n else f"is {len(s)}-D", "f")
            if not np.isfinite(value).all():
                raise z.error(f"its {key!r} holds NaN or inf values")
            out.append(value)
    return tuple(out)

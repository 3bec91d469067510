"""Checkpoint files of a guided run: the sampler state, the logs so far and the settings'
digest in one .npz, written atomically (a kill leaves the previous checkpoint whole)."""

import os

import jax.numpy as jnp
import numpy as np

from flow.errors import InputError
from flow.files import NpzFile, write_atomic

_FIX = "start the run again without it (--overwrite)"
_FIXED = {"z", "step", "keys", "digest"}  # the arrays every checkpoint holds


def _shaped(want: tuple[int, ...]):
    return lambda shape, dtype: None if shape == tuple(want) else f"has shape {shape}, want {want}"


def _any(shape, dtype) -> None:
    return None


def _digest(shape, dtype) -> str | None:
    return None if shape == () and dtype.itemsize <= 1024 else "is not a settings digest"


class Checkpoint:
    """The checkpoint at `path` of a run whose settings hash to `digest` (mgjax.config.digest)."""

    def __init__(self, path: str, digest: str):
        self.path, self.digest = str(path), digest

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    def save(self, state, logs: dict, **extra) -> None:
        """The state, logs name -> list of chunks f32[L,K,B] (or arrays), and `extra` arrays."""
        arrays = {f"log_{k}": np.concatenate(v) for k, v in logs.items()}
        arrays |= {f"extra_{k}": np.asarray(v) for k, v in extra.items()}

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    z=np.asarray(state.z),
                    step=np.asarray(state.step),
                    keys=np.asarray(state.keys),
                    digest=np.asarray(self.digest),
                    **arrays,
                )

        write_atomic(self.path, write)

    def _open(self) -> NpzFile:
        """The checkpoint's arrays: the names a checkpoint holds, and no more bytes than the
        file does (np.savez stores its members uncompressed)."""
        z = NpzFile(self.path, "checkpoint", _FIX, max_bytes=os.path.getsize(self.path))
        odd = [k for k in z.keys if k not in _FIXED and not k.startswith(("log_", "extra_"))]
        if odd or not _FIXED <= set(z.keys):
            z.close()
            raise z.error("it is not a checkpoint written by mgjax")
        return z

    def load(self, state):
        """(state with the saved z, step and keys, logs name -> [f32[S,K,B]], extra name ->
        array). A checkpoint of other settings is an InputError."""
        with self._open() as c:
            digest = c.read("digest", _digest, "U")
            if str(digest) != self.digest:
                raise InputError(
                    f"{self.path} was written with other settings; use the same settings, or "
                    "start again without it"
                )
            z = c.read("z", _shaped(np.shape(state.z)), "f")
            keys = c.read("keys", _shaped(np.shape(state.keys)), "u")
            state = state.replace(
                z=jnp.asarray(z), step=jnp.asarray(self._step(c)), keys=jnp.asarray(keys)
            )
            logs = {k[4:]: [c.read(k, _any, "f")] for k in c.keys if k.startswith("log_")}
            extra = {k[6:]: c.read(k, _any) for k in c.keys if k.startswith("extra_")}
        for name, value in [("z", z), *((k, v[0]) for k, v in logs.items())]:
            with np.errstate(invalid="ignore"):
                finite = np.isfinite(value).all()
            if not finite:
                raise InputError(f"{self.path}: its {name!r} holds NaN or inf values; {_FIX}")
        return state, logs, extra

    def _step(self, c: NpzFile) -> int:
        step = int(c.read("step", _shaped(()), "iu"))
        if step < 0:
            raise c.error(f"its step {step} is negative")
        return step

    def step(self) -> int:
        """The DDIM step the saved state starts at."""
        with self._open() as c:
            return self._step(c)

    def remove(self) -> None:
        if self.exists():
            os.remove(self.path)

"""Checkpoint files of a guided run: the sampler state, the logs so far and the settings'
digest in one .npz, written atomically (a kill leaves the previous checkpoint whole)."""

import os

import jax.numpy as jnp
import numpy as np

from flow.errors import InputError
from flow.files import write_atomic


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

    def load(self, state):
        """(state with the saved z, step and keys, logs name -> [f32[S,K,B]], extra name ->
        array). A checkpoint of other settings is an InputError."""
        with np.load(self.path, allow_pickle=False) as c:
            if "digest" not in c.files or str(c["digest"]) != self.digest:
                raise InputError(
                    f"{self.path} was written with other settings; use the same settings, or "
                    "start again without it"
                )
            state = state.replace(
                z=jnp.asarray(c["z"]), step=jnp.asarray(c["step"]), keys=jnp.asarray(c["keys"])
            )
            logs = {k[4:]: [c[k]] for k in c.files if k.startswith("log_")}
            extra = {k[6:]: c[k] for k in c.files if k.startswith("extra_")}
        return state, logs, extra

    def step(self) -> int:
        """The DDIM step the saved state starts at."""
        with np.load(self.path, allow_pickle=False) as c:
            return int(c["step"])

    def remove(self) -> None:
        if self.exists():
            os.remove(self.path)

"""What an edit needs to know of a model before loading it: its latent grid (latent channels,
VAE factor, default image size), read from the model's config files alone, so that every input
file is checked against the right sizes before any weight is read. Imports neither diffusers nor
transformers (importing them takes longer than all the checks together)."""

import dataclasses
import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from flow.errors import InputError


@dataclasses.dataclass(frozen=True)
class Geometry:
    latent_channels: int  # channels of a latent (4 for SD)
    vae_factor: int  # image pixels per latent pixel (8 for SD)
    sample_size: int  # the UNet's latent side at the model's default image size

    @property
    def image_size(self) -> int:
        """The side of a generated image, in pixels."""
        return self.sample_size * self.vae_factor


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub can be reached: False when its offline setting (HF_HUB_OFFLINE) is
    on, or when one connection to its endpoint fails within `timeout` seconds (instead of the
    hub client's minutes of retries)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def offline_error(model: str, revision: str | None) -> InputError:
    return InputError(
        f"{model} (revision {revision}) is not in the local hub cache and the hub cannot be "
        "reached (offline); give a local diffusers folder with --model, or download the "
        f"model where there is network: huggingface-cli download {model} --revision {revision}"
    )


def _config_file(model: str, revision: str | None, name: str) -> str:
    """The path of `name` (e.g. "vae/config.json") in a local folder, the local hub cache, or
    fetched from the hub when it can be reached."""
    if os.path.isdir(model):
        path = Path(model) / name
        if not path.is_file():
            part = name.split("/")[0]
            raise InputError(
                f"{model}: no {name}; a diffusers folder holds {part}/ with its config.json"
            )
        return str(path)
    if os.path.exists(model) or model.startswith((".", "/")):
        raise InputError(f"{model}: no such folder; give a diffusers folder or a hub id")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    folder, file = name.split("/")
    try:
        return hf_hub_download(
            model, file, subfolder=folder, revision=revision, local_files_only=True
        )
    except LocalEntryNotFoundError:
        pass
    if not hub_reachable():
        raise offline_error(model, revision)
    try:
        return hf_hub_download(model, file, subfolder=folder, revision=revision)
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(
            f"cannot read {name} of {model!r} (revision {revision}): {first}; check the hub id "
            "and revision, or give a local diffusers folder with --model"
        ) from None


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable {what} ({e})") from None
    except RecursionError:
        raise InputError(f"{path}: not a readable {what} (nested too deep)") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a {what} (expected a JSON object)")
    return data


def _positive_int(data: dict, key: str, path: str, default=None) -> int:
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 4096:
        raise InputError(f"{path}: {key} must be a positive whole number, got {value!r}")
    return value


def geometry(model: str, revision: str | None = None) -> Geometry:
    """The latent grid of a diffusers-format model (local folder or hub id + revision), from
    vae/config.json and unet/config.json; an InputError naming what is missing or malformed."""
    vae_path = _config_file(model, revision, "vae/config.json")
    unet_path = _config_file(model, revision, "unet/config.json")
    vae, unet = _read_json(vae_path, "VAE config"), _read_json(unet_path, "UNet config")
    blocks = vae.get("block_out_channels")
    if not isinstance(blocks, list) or not 1 <= len(blocks) <= 8:
        raise InputError(f"{vae_path}: block_out_channels must be a list of 1 to 8 numbers")
    return Geometry(
        latent_channels=_positive_int(vae, "latent_channels", vae_path, 4),
        vae_factor=2 ** (len(blocks) - 1),
        sample_size=_positive_int(unet, "sample_size", unet_path, 64),
    )

"""What the page authors, turned into what launch.py runs: files in a server-owned folder, a
Config resolved exactly as a jobs-file line is, and the target-flow preview computed by
launch.py's own functions (mgjax.edit.workflow.target,
mgjax.edit.motion.auto_frozen_mask), so the flow the page shows is the flow an edit uses.

Nothing the client sends is used as a path: uploads are stored under names the server makes
(random or content hashes) and referred to by those names, which are checked against a pattern.
"""

import base64
import hashlib
import io
import os
import re
import threading
import uuid

import numpy as np
from PIL import Image

from flow.errors import InputError
from flow.files import MAX_PIXELS, read_image
from flow.viz import flow_to_color
from mgjax import config as C
from mgjax.edit.motion import auto_frozen_mask, centroid
from mgjax.edit.readers import fit_image, read_mask_image

MAX_UPLOAD_BYTES = 16 * 1024 * 1024  # an upload's body; a larger one is refused unread
_ID = re.compile(r"^(src|gen|mask)-[0-9a-f]{32}$")
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}
# The settings the page shows and sends (a jobs-file line's keys); the rest come from the
# command line the server was started with.
PAGE_SETTINGS = ("steps", "recursive_steps", "guidance_weight", "seed", "num_samples", "mask_grow")
# The work a preview does in the request's own thread grows with these: more is refused.
MAX_DRAG_PAIRS = 32  # the thin-plate spline's system and kernels grow with the pairs
MAX_MOTION_TERMS = 32  # composed motions ("a+b+..."); more say nothing a few cannot


def png_bytes(image_u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_u8).save(buf, format="PNG")
    return buf.getvalue()


def data_url(image_u8: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image_u8)).decode()


class Store:
    """The page's images and masks, as PNG files under `root` named by the server, at most
    `max_images` of them and `max_bytes` in all: past either, the least recently used are
    removed (a queued edit has copied its own inputs into its run folder already)."""

    def __init__(self, root: str, max_images: int = 64, max_bytes: int = 512 * 2**20):
        self.root, self.max_images, self.max_bytes = root, max_images, max_bytes
        self.used: dict[str, int] = {}  # id -> bytes, least recently used first
        self.lock = threading.Lock()
        os.makedirs(root, exist_ok=True)

    def path(self, ident: str) -> str:
        """The file of a stored id; an InputError for anything else (never a client path)."""
        if not isinstance(ident, str) or not _ID.match(ident):
            raise InputError("unknown image id; upload the image again")
        path = os.path.join(self.root, ident + ".png")
        with self.lock:
            if ident not in self.used or not os.path.isfile(path):
                raise InputError(
                    "that image was removed from the server (it keeps the "
                    f"{self.max_images} most recently used images and masks); upload it "
                    "or pick the scene again"
                )
            self.used[ident] = self.used.pop(ident)  # most recently used now
        return path

    def _added(self, ident: str, path: str) -> None:
        """Count a written file and remove the least recently used past the bounds."""
        with self.lock:
            self.used.pop(ident, None)
            self.used[ident] = os.path.getsize(path)
            while len(self.used) > 1 and (
                len(self.used) > self.max_images or sum(self.used.values()) > self.max_bytes
            ):
                old = next(iter(self.used))
                del self.used[old]
                try:
                    os.unlink(os.path.join(self.root, old + ".png"))
                except FileNotFoundError:
                    pass

    def size(self, ident: str) -> tuple[int, int]:
        """(H, W) of a stored image."""
        with Image.open(self.path(ident)) as im:
            return im.size[1], im.size[0]

    def put(self, prefix: str, image_u8: np.ndarray, ident: str | None = None) -> str:
        ident = ident or f"{prefix}-{uuid.uuid4().hex}"
        path = os.path.join(self.root, ident + ".png")
        if not os.path.isfile(path):
            tmp = f"{path}.{uuid.uuid4().hex}.part"
            Image.fromarray(image_u8).save(tmp, format="PNG")
            os.replace(tmp, path)
        self._added(ident, path)
        return ident

    def add_source(self, body: bytes, native: int, factor: int) -> dict:
        """An uploaded PNG/JPEG as a source the model takes: scaled down so that its longer side
        is at most `native` pixels, then to multiples of `factor` (mgjax.edit.readers.fit_image)."""
        kind = next((k for m, k in _MAGIC.items() if body.startswith(m)), None)
        if kind is None:
            raise InputError("the upload is not a PNG or JPEG image; choose a .png or .jpg file")
        tmp = os.path.join(self.root, f"upload-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(body)
        try:
            pixels = read_image(tmp, "image", "RGB")
        except InputError as e:
            raise InputError(str(e).replace(tmp, f"the uploaded {kind}")) from None
        finally:
            os.unlink(tmp)
        h, w = pixels.shape[:2]
        im = Image.fromarray(pixels)
        if max(h, w) > native:
            s = native / max(h, w)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.LANCZOS)
        image = fit_image(np.asarray(im, np.float32)[None] / 255.0, factor, True, "upload")
        out = np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)
        ident = self.put("src", out)
        th, tw = out.shape[:2]
        note = "" if (th, tw) == (h, w) else f"resized from {w}x{h} to {tw}x{th} for the model"
        return dict(id=ident, width=tw, height=th, note=note)

    def add_mask(self, encoded: str, h: int, w: int) -> str:
        """A painted mask sent as a base64 PNG (white = object) of the source's size, stored
        under its content hash (the same mask sent again is the same file)."""
        try:
            body = base64.b64decode(encoded.split(",")[-1], validate=True)
        except (ValueError, AttributeError):
            raise InputError("the mask is not base64 PNG data; paint it again") from None
        if not body.startswith(b"\x89PNG\r\n\x1a\n"):
            raise InputError("the mask is not a PNG image; paint or upload it again")
        ident = "mask-" + hashlib.sha256(body).hexdigest()[:32]
        path = os.path.join(self.root, ident + ".png")
        if ident in self.used and os.path.isfile(path):
            self._added(ident, path)
        else:
            tmp = f"{path}.{uuid.uuid4().hex}.part"
            with open(tmp, "wb") as f:
                f.write(body)
            try:
                mask = read_mask_image(tmp, h, w)
            except InputError as e:
                raise InputError(str(e).replace(tmp, "the mask")) from None
            finally:
                os.unlink(tmp)
            self.put("mask", mask.astype(np.uint8) * 255, ident)
        return ident


def toy_scenes(count: int = 8) -> list[dict]:
    """The toy world's scenes the page offers: the pack's demo, then shapes scenes by seed."""
    from mgjax.toy import pack, shapes

    out = [dict(name="demo", seed=None, prompt=pack.info()["demo"]["prompt"])]
    for seed in range(count):
        scene = shapes.sample_scene(np.random.default_rng(seed), 64)
        out.append(dict(name=f"scene {seed}", seed=seed, prompt=shapes.prompt(scene)))
    return out


def toy_scene(store: Store, seed: int | None) -> dict:
    """A toy scene stored as a source, with its prompt and its first object's mask; seed None:
    the pack's demo (its demo.png, demo_mask.png and prompt)."""
    from mgjax.toy import pack, shapes

    if seed is None:
        demo = pack.demo_files()
        image = read_image(demo["image"], "image", "RGB")
        mask, prompt = read_image(demo["object_mask"], "mask", "L"), demo["prompt"]
    else:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise InputError("a toy scene is chosen by a seed from 0 to 2^31 - 1")
        scene = shapes.sample_scene(np.random.default_rng(seed), 64)
        drawn = shapes.render(scene)
        image = np.clip(np.rint(drawn["image"] * 255), 0, 255).astype(np.uint8)
        mask, prompt = drawn["masks"][0].astype(np.uint8) * 255, shapes.prompt(scene)
    ident = store.put("src", image, f"src-{hashlib.sha256(image.tobytes()).hexdigest()[:32]}")
    h, w = image.shape[:2]
    return dict(id=ident, width=w, height=h, prompt=prompt, mask=data_url(mask))


def text(spec: dict, key: str) -> str | None:
    value = spec.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InputError(f"{key} must be text")
    return value.strip() or None


def job_values(spec: dict, store: Store, native: int) -> tuple[dict, int, int]:
    """(a jobs-file line's keys, with paths to stored files, H, W) from what the page sends:
    {"image": id | None, "prompt", "mask": base64 PNG | None, "box", "motion", "drag",
    "preset", and PAGE_SETTINGS}; without an image the source is generated at `native` px."""
    if not isinstance(spec, dict):
        raise InputError("the request is not a JSON object")
    job: dict = {}
    image, h, w = text(spec, "image"), native, native
    if image:
        job["image"] = store.path(image)
        h, w = store.size(image)
    job["prompt"] = text(spec, "prompt") or ""
    if not image and not job["prompt"]:
        raise InputError("no source: upload an image, pick a scene or type a prompt")
    if text(spec, "mask") and text(spec, "box"):
        raise InputError("give a painted mask or a box, not both; clear one of them")
    if text(spec, "mask"):
        job["object_mask"] = store.path(store.add_mask(text(spec, "mask"), h, w))
    for key in ("motion", "drag"):
        if text(spec, key):
            job[key] = text(spec, key)
    if "motion" in job and "drag" in job:
        raise InputError("give a motion or drag points, not both; clear one of them")
    if text(spec, "box"):
        job["object_box"] = text(spec, "box")
    if spec.get("preset"):
        job["preset"] = spec["preset"]
    for key in PAGE_SETTINGS:
        if spec.get(key) is not None:
            job[key] = spec[key]
    return job, h, w


def resolve(explicit: dict, preset: str, job: dict) -> C.Config:
    """The edit's Config: default < preset < the command line's flags < the page's values,
    checked as launch.py checks its flags and a jobs file's lines (mgjax.config)."""
    try:
        return C.resolve(explicit, preset, job)
    except OverflowError as e:
        raise InputError(_one_line(f"a number in the settings is too large ({e})")) from None
    except (ValueError, TypeError, KeyError) as e:  # a value of the wrong kind
        raise InputError(_one_line(str(e) or f"{type(e).__name__} in the settings")) from None
    except RecursionError:
        raise InputError("the settings are nested too deep; send flat values") from None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_work(config: C.Config, h: int, w: int, vae_factor: int) -> None:
    """Refuse the values that would make the target flow's work (growing the object, dilating
    the frozen mask, fitting drag pairs, composing motions) unbounded for an h x w image: what
    is past the frame's own size changes nothing, and more pairs or terms than the page makes
    only cost time."""
    mo = config.motion
    if mo.mask_grow > h + w:
        raise InputError(
            f"mask_grow {mo.mask_grow} is more than the {w}x{h} image's {h + w} pixels (which "
            "already grow the object over the whole frame); use a smaller mask_grow"
        )
    latent = max(h, w) // vae_factor  # a square dilation by this covers the latent grid
    if mo.dilate > latent:
        raise InputError(
            f"--dilate {mo.dilate} is more than the {latent} latent pixels across this image "
            "(which already free the whole frame); start the editor with a smaller --dilate"
        )
    if mo.drag:
        pairs = sum(1 for p in mo.drag.replace("\n", ";").split(";") if p.strip())
        if pairs > MAX_DRAG_PAIRS:
            raise InputError(
                f"the drag has {pairs} pairs, more than the {MAX_DRAG_PAIRS} allowed; "
                "use fewer points"
            )
    if mo.motion:
        terms = sum(1 for t in mo.motion.split("+") if t.strip())
        if terms > MAX_MOTION_TERMS:
            raise InputError(
                f"the motion composes {terms} motions, more than the {MAX_MOTION_TERMS} "
                "allowed; combine them into fewer"
            )


def relabel(text: str, store_root: str, run_roots: tuple[str, ...] = ()) -> str:
    """`text` without server-side paths: a file of the store (or being read into it) is "the
    image", "the mask" or "the upload"; a path in a run folder is "the run folder NAME" (and
    its inputs "the image" and "the mask", as the page calls them)."""
    roots = [(r, True) for r in (store_root, os.path.abspath(store_root))]
    roots += [(r, False) for root in run_roots for r in (root, os.path.abspath(root))]
    for root, store in sorted(set(roots), key=lambda r: -len(r[0])):
        root = root.rstrip(os.sep)
        if not root:
            continue
        end = r"[^\s'\",:]"  # a path runs to a space, a quote, a comma or a colon
        pattern = re.escape(root) + rf"(?:{re.escape(os.sep)}{end}*)?(?!{end})"
        text = re.sub(pattern, lambda m, r=root, s=store: _label(m.group(), r, s), text)
    return text


def _label(path: str, root: str, store: bool) -> str:
    parts = [p for p in path[len(root) :].split(os.sep) if p]
    if store:
        name = parts[-1] if parts else ""
        if name.startswith("mask-"):
            return "the mask"
        return "the upload" if name.startswith("upload-") else "the image"
    if not parts:
        return "the runs folder"
    if parts[1:2] == [_inputs()] and len(parts) == 3:
        known = {"source.png": "the image", "object_mask.png": "the mask"}
        if parts[2] in known:
            return known[parts[2]]
    inside = "/".join(parts[1:])
    return f"the run folder {parts[0]}" + (f" ({inside})" if inside else "")


def _inputs() -> str:
    from mgjax.editor.runner import INPUTS  # the run folder's copies of the authored files

    return INPUTS


def preview(config: C.Config, h: int, w: int, vae_factor: int) -> dict:
    """The target flow and the automatic frozen mask of an authored edit, as launch.py makes
    them: the flow as the colour wheel (scaled to its largest displacement, as target_flow.png;
    alpha 0 where nothing moves), the frozen mask at the latent grid (255 = kept)."""
    from mgjax.edit.motion import box_mask
    from mgjax.edit.workflow import target

    mo = config.motion
    if not (mo.motion or mo.drag):  # nothing moves yet: the object's centre for the tools
        obj = None
        if mo.object_mask:
            obj = read_mask_image(mo.object_mask, h, w)
        elif mo.object_box:
            obj = box_mask(mo.object_box, h, w)
        ok = obj is not None and obj.any()
        return dict(
            flow=None, frozen=None, center=centroid(obj) if ok else ((w - 1) / 2, (h - 1) / 2)
        )
    flow, obj = target(config, None, h, w)
    frozen = auto_frozen_mask(flow, vae_factor, config.motion.dilate)[0, 0]
    norm = float(np.linalg.norm(flow, axis=-1).max())
    moving = np.any(flow != 0, axis=-1)
    # the colour wheel where something moves, transparent where nothing does
    colours = np.dstack([flow_to_color(flow, max(norm, 1e-6)), moving.astype(np.uint8) * 255])
    return dict(
        flow=data_url(colours),
        frozen=data_url(frozen.astype(np.uint8) * 255),
        max_displacement=norm,
        moving_pixels=int(moving.sum()),
        center=centroid(obj) if obj is not None else ((w - 1) / 2, (h - 1) / 2),
    )


def limits(store: Store | None = None) -> dict:
    out = dict(
        max_upload_bytes=MAX_UPLOAD_BYTES,
        max_pixels=MAX_PIXELS,
        max_drag_pairs=MAX_DRAG_PAIRS,
        max_motion_terms=MAX_MOTION_TERMS,
    )
    if store is not None:
        out |= dict(max_uploads=store.max_images, upload_store_bytes=store.max_bytes)
    return out

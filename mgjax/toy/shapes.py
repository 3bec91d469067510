"""A procedural "shapes" world: seeded scenes of one or two objects on textured backgrounds,
their exact masks, short prompts, and the same scene with an object moved by any projective
motion (exact target flow and exact ground-truth edit).

Every picture is a function of continuous image coordinates (x right, y down, pixel (i, j)
centred at (x, y) = (j, i)), rendered with 4x4 supersampling. An object is drawn by mapping
each pixel back into the object's own frame, so a moved object carries its texture with it
and the background it uncovers is known exactly.

  scene = sample_scene(np.random.default_rng(0))
  out = render(scene)                       # image f32[H,W,3] in [0,1], masks bool[n,H,W]
  moved = render(scene, {0: matrix})        # object 0 moved by a 3x3 point map
  flow = object_flow(scene, 0, matrix)      # f32[H,W,2], zero off the object
  prompt(scene)                             # "a red square on a striped blue background"
"""

import dataclasses

import numpy as np

from mgjax.edit import motion

COLORS = {
    "red": (0.86, 0.16, 0.14),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.95, 0.86, 0.20),
    "green": (0.18, 0.68, 0.24),
    "blue": (0.16, 0.34, 0.86),
    "purple": (0.55, 0.22, 0.72),
    "white": (0.95, 0.95, 0.95),
    "black": (0.08, 0.08, 0.08),
}
SHAPES = ("circle", "square", "triangle", "diamond")
FILLS = ("solid", "dotted")
PATTERNS = ("striped", "checkered", "wavy")
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    fill: str
    cx: float
    cy: float
    radius: float  # pixels, centre to the farthest point of the shape
    angle: float  # radians, counter-clockwise on screen


@dataclasses.dataclass(frozen=True)
class Scene:
    size: int
    color: str  # background base colour
    pattern: str
    frequency: float  # pattern cycles per pixel
    direction: float  # pattern orientation, radians
    gradient: float  # direction of the smooth brightness ramp, radians
    objects: tuple[Obj, ...]


def sample_scene(rng: np.random.Generator, size: int = 64, n_objects: int | None = None):
    """A random scene: objects of distinct colours, fully inside the frame, not overlapping."""
    n = n_objects or int(rng.choice([1, 1, 2]))
    bg = str(rng.choice(list(COLORS)))
    colors = [c for c in COLORS if c != bg]
    rng.shuffle(colors)
    objects = []
    while len(objects) < n:
        r = size * rng.uniform(0.13, 0.24)
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        if all(np.hypot(cx - o.cx, cy - o.cy) > r + o.radius + 2 for o in objects):
            objects.append(
                Obj(
                    shape=str(rng.choice(SHAPES)),
                    color=colors[len(objects)],
                    fill=str(rng.choice(FILLS)),
                    cx=float(cx),
                    cy=float(cy),
                    radius=float(r),
                    angle=float(rng.uniform(0, 2 * np.pi)),
                )
            )
    return Scene(
        size=size,
        color=bg,
        pattern=str(rng.choice(PATTERNS)),
        frequency=float(rng.uniform(0.08, 0.16)),
        direction=float(rng.uniform(0, np.pi)),
        gradient=float(rng.uniform(0, 2 * np.pi)),
        objects=tuple(objects),
    )


def prompt(scene: Scene) -> str:
    """ "a red square [and a dotted green circle] on a striped blue background"."""
    things = []
    for o in scene.objects:
        words = f"{'dotted ' if o.fill == 'dotted' else ''}{o.color} {o.shape}"
        things.append(("an " if words[0] in "aeiou" else "a ") + words)
    return f"{' and '.join(things)} on a {scene.pattern} {scene.color} background"


def _grid(size: int, ss: int = SUPERSAMPLE):
    """Supersample positions f64[size*ss, size*ss] (x, y) in pixel coordinates."""
    t = (np.arange(size * ss) + 0.5) / ss - 0.5
    return np.meshgrid(t, t)


def _background(scene: Scene, x, y):
    base = np.asarray(COLORS[scene.color])
    u = x * np.cos(scene.direction) + y * np.sin(scene.direction)
    v = -x * np.sin(scene.direction) + y * np.cos(scene.direction)
    w = 2 * np.pi * scene.frequency
    if scene.pattern == "striped":
        tex = np.sin(w * u)
    elif scene.pattern == "checkered":
        tex = np.tanh(3 * np.sin(w * u) * np.sin(w * v))
    else:  # wavy
        tex = np.sin(w * u + 2.0 * np.sin(0.5 * w * v))
    ramp = (x * np.cos(scene.gradient) + y * np.sin(scene.gradient)) / scene.size
    shade = 0.75 + 0.2 * tex + 0.25 * ramp
    # pattern contrast also in hue: mix towards the complementary grey by the texture
    img = base[None, None] * shade[..., None] + 0.12 * tex[..., None] * (0.5 - base)[None, None]
    return np.clip(img, 0.0, 1.0)


def _local(o: Obj, x, y):
    """Positions in the object's frame (units of its radius, its rotation undone)."""
    dx, dy = (x - o.cx) / o.radius, (y - o.cy) / o.radius
    c, s = np.cos(o.angle), np.sin(o.angle)
    # screen rotation counter-clockwise with y down: undo it
    return c * dx - s * dy, s * dx + c * dy


def _inside(shape: str, u, v):
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 1 / np.sqrt(2)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    # equilateral triangle with vertices on the unit circle, apex up (v < 0 is up)
    return (v <= 0.5) & (np.sqrt(3) * u - v <= 1.0) & (-np.sqrt(3) * u - v <= 1.0)


def _object_color(o: Obj, u, v):
    base = np.asarray(COLORS[o.color])
    if o.fill == "dotted":
        dots = np.cos(3 * np.pi * u) * np.cos(3 * np.pi * v)
        shade = 0.8 + 0.2 * dots
    else:
        shade = 0.9 + 0.1 * v  # a soft shading, so that a solid fill is not flat
    return np.clip(base[None, None] * shade[..., None] + 0.05, 0.0, 1.0)


def _apply_inverse(matrix, x, y):
    """Positions p with matrix @ p = (x, y): where each output position comes from."""
    inv = np.linalg.inv(np.asarray(matrix, np.float64))
    w = inv[2, 0] * x + inv[2, 1] * y + inv[2, 2]
    return (inv[0, 0] * x + inv[0, 1] * y + inv[0, 2]) / w, (
        inv[1, 0] * x + inv[1, 1] * y + inv[1, 2]
    ) / w


def render(
    scene: Scene,
    moves: dict[int, np.ndarray] | None = None,
    background_shift=(0, 0),
    supersample: int = SUPERSAMPLE,
):
    """The scene, objects k moved by the 3x3 point maps moves[k], the background translated by
    `background_shift` pixels. Returns {"image": f32[H,W,3] in [0, 1], "masks": bool[n,H,W]
    (pixels where object k is visible, at least half covered)}."""
    moves = moves or {}
    x, y = _grid(scene.size, supersample)
    img = _background(scene, x - background_shift[0], y - background_shift[1])
    cover = np.zeros((len(scene.objects),) + x.shape, bool)
    for k, o in enumerate(scene.objects):
        ox, oy = _apply_inverse(moves[k], x, y) if k in moves else (x, y)
        u, v = _local(o, ox, oy)
        inside = _inside(o.shape, u, v)
        img = np.where(inside[..., None], _object_color(o, u, v), img)
        cover[:k] &= ~inside  # later objects cover earlier ones
        cover[k] = inside
    ss, n = supersample, scene.size
    image = img.reshape(n, ss, n, ss, 3).mean(axis=(1, 3)).astype(np.float32)
    masks = cover.reshape(-1, n, ss, n, ss).mean(axis=(2, 4)) >= 0.5
    return {"image": image, "masks": masks}


def object_flow(scene: Scene, k: int, matrix) -> np.ndarray:
    """The exact flow f32[H,W,2] of moving object k by `matrix`: T(p) - p on the pixels where k
    is visible in the source, zero elsewhere."""
    mask = render(scene)["masks"][k]
    return motion.motion_flow(motion.Motion(matrix, ""), scene.size, scene.size, mask)


def affine_about(center, shift=(0.0, 0.0), degrees=0.0, scale=1.0) -> np.ndarray:
    """3x3 map p -> c + s R(deg) (p - c) + shift (R counter-clockwise on screen, y down)."""
    out = motion.about(center, scale * motion.rotation(degrees))
    out[:2, 2] += np.asarray(shift, np.float64)
    return out


def flow_pair(
    rng: np.random.Generator, size: int = 64, supersample: int = 2, local_share: float = 0.0
):
    """A training pair for optical flow. In 70% of the pairs the whole view shifts by up to
    10 px (background and objects), in the rest it is still; on top of that every object moves
    by its own random similarity (shift <= 10 px, rotation <= 35 deg, scale 0.8-1.25).
    The view shift is what makes RAFT learn matching at all: on pairs whose flow is mostly zero
    (only objects moving) it settles on predicting zero flow; whole-view shifts break that.
    `local_share`: that share of the pairs instead keeps the view still and turns or scales
    each object about its own centre (10-35 deg either way, or x0.75-0.85 / x1.2-1.35, shifted
    by at most 2 px): the small motions of a rotation or scaling edit, which the shifted pairs
    hide under their shift.
    Returns (image1, image2 f32[H,W,3] in [0, 1], exact flow f32[H,W,2] of every pixel)."""
    scene = sample_scene(rng, size)
    local = local_share > 0 and rng.uniform() < local_share  # share 0: the pairs as before
    shift = np.zeros(2) if local else rng.uniform(-10, 10, 2) * (rng.uniform() < 0.7)
    moves = {}
    for k, o in enumerate(scene.objects):
        if local:
            turn = rng.uniform() < 0.5
            angle = rng.choice([-1, 1]) * rng.uniform(10, 35) if turn else 0.0
            scale = 1.0 if turn else (rng.uniform(0.75, 0.85) if rng.uniform() < 0.5
                                      else rng.uniform(1.2, 1.35))  # fmt: skip
            own = affine_about((o.cx, o.cy), rng.uniform(-2, 2, 2), angle, scale)
        else:
            own = affine_about(
                (o.cx, o.cy),
                rng.uniform(-10, 10, 2),
                rng.uniform(-35, 35),
                np.exp(rng.uniform(np.log(0.8), np.log(1.25))),
            )
        moves[k] = affine_about((0.0, 0.0), shift) @ own
    src = render(scene, {}, (0, 0), supersample)
    dst = render(scene, moves, shift, supersample)
    flow = np.broadcast_to(shift, (size, size, 2)).copy()
    for k, m in moves.items():
        moved = src["masks"][k]
        flow[moved] = motion.motion_flow(motion.Motion(m, ""), size, size)[moved]
    return src["image"], dst["image"], flow.astype(np.float32)


# The training scripts render in worker processes, which import the function they call: these
# live here, where a worker imports the world alone instead of a training script and its
# model libraries (seconds per worker).


def seeded_scene(seed: int, size: int = 64, supersample: int = SUPERSAMPLE):
    """The scene of one seed, rendered: (image f32[H,W,3] in [0, 1], union of its objects'
    exact masks bool[H,W], prompt)."""
    scene = sample_scene(np.random.default_rng(seed), size)
    out = render(scene, supersample=supersample)
    return out["image"], out["masks"].any(axis=0), prompt(scene)


def seeded_flow_pair(seed: int, size: int = 64, local_share: float = 0.0):
    """`flow_pair` of one seed."""
    return flow_pair(np.random.default_rng(seed), size, local_share=local_share)

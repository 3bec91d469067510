"""Regenerates the pictures of the docs from the shipped toy pack (CPU, a few minutes).

    python -m docs.make_figures                  # every figure
    python -m docs.make_figures --only rotation  # one of them (demo, rotation, scaling)

Each edit runs as `python launch.py` would with the toy preset, into a temporary folder; its
panel (source | target flow | edit | achieved flow | difference, the 64x64 images shown 3x,
nearest neighbour) and the demo edit's loss curves are copied into docs/ as they are:

    docs/toy_demo_panel.png     python launch.py --out_dir out/demo
    docs/toy_demo_losses.png    the same run's losses.png
    docs/toy_rotation_panel.png the demo scene, --motion rotate:30
    docs/toy_scaling_panel.png  the demo scene, --motion scale:1.5
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image

from mgjax import config as C
from mgjax.edit.workflow import run
from mgjax.toy import pack

DOCS = Path(__file__).resolve().parent


def own_motion(motion: str) -> dict:
    """The demo scene (image, object mask, prompt) with another motion."""
    files = pack.demo_files()
    return dict(
        image=str(files["image"]),
        object_mask=str(files["object_mask"]),
        prompt=pack.info()["demo"]["prompt"],
        motion=motion,
    )


FIGURES = {
    "demo": ({}, "toy_demo_panel.png", "toy_demo_losses.png"),
    "rotation": (own_motion("rotate:30"), "toy_rotation_panel.png", None),
    "scaling": (own_motion("scale:1.5"), "toy_scaling_panel.png", None),
}


def make(name: str, work: Path, log=print) -> list[Path]:
    """Runs one figure's edit in `work` and writes its pictures into docs/."""
    flags, panel_name, losses_name = FIGURES[name]
    out = work / name
    run(C.resolve(dict(flags, out_dir=str(out))), log=lambda s: None)
    sample = out / "sample_00"
    panel = Image.open(sample / "panel.png").convert("RGB")
    written = [DOCS / panel_name]
    panel.save(written[0], optimize=True)
    if losses_name:
        written.append(DOCS / losses_name)
        shutil.copyfile(sample / "losses.png", written[-1])
    for path in written:
        log(f"{name}: wrote {path.relative_to(DOCS.parent)}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(FIGURES), action="append")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mgjax-figures-") as work:
        for name in args.only or list(FIGURES):
            make(name, Path(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())

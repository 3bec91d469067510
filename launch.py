"""mgjax command line: edit an image so that it shows a given motion.

The editing workflow is not implemented yet (it builds on the guided sampler); for now this
prints its help. Optical flow is available today: python -m flow.estimate --help
"""

from absl import app, flags

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    print(__doc__.strip())
    print("\nUsage: python launch.py --helpfull")


if __name__ == "__main__":
    app.run(main)

"""mgjax: edit an image so that it shows a given motion (Motion Guidance, in JAX).

  # the shipped toy pack (mgjax/toy/pack, the default model): its demo edit, on CPU
  python launch.py --out_dir out/demo
  # the toy pack on a source and motion of your own
  python launch.py --image shapes.png --object_mask shape_mask.png --motion rotate:30 \\
      --out_dir out/mine
  # Stable Diffusion v1.4 and RAFT (raft-things.pth) for real images:
  # a generated source: prompt + seed, then move the object in a box 40 px right
  python launch.py --model CompVis/stable-diffusion-v1-4 --raft_weights raft-things.pth \\
      --prompt "a photo of an apple on a table" --seed 0 \\
      --motion translate:40,0 --object_box 180,200,330,350 --out_dir out/apple
  # a real image (inverted first), rotated 30 degrees inside a mask
  python launch.py --model CompVis/stable-diffusion-v1-4 --image cat.png --motion rotate:30 \\
      --object_mask cat_mask.png ...
  # many edits, batched over the local devices (one JSON object of flags per line)
  python launch.py --jobs jobs.jsonl --out_dir runs/batch --model CompVis/stable-diffusion-v1-4 \\
      --raft_weights raft-things.pth
  # the browser motion editor at http://127.0.0.1:8765/ (docs/editor.md)
  python launch.py --serve
  # the authors' example folders
  python launch.py --model CompVis/stable-diffusion-v1-4 --data_dir data/apple \\
      --target_flow_name right.pth --edit_mask_name right.mask.pth ...

Method flags take their preset's values: --preset auto is toy for the toy pack (scaled for
its 64x64 images, full RAFT gradient) and paper (the reference's values, shown as the flags'
defaults) for real models; --preset fast trades quality for time. Precedence: default < preset <
explicit flag < a jobs-file line's key. Ctrl-C leaves what was computed; --resume continues it.
--overwrite replaces only folders that mgjax wrote. Exit status: 0 done, 2 a bad input (one
"error:" line), 3 some --jobs did not finish (summary.csv says which), 130 interrupted.
"""

import dataclasses
import os
import sys

from absl import app, flags, logging

from flow.errors import InputError, run_cli
from mgjax import config as C
from mgjax.editor.limits import Limits
from mgjax.model import without_torch

_KINDS = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float}


def _define(name: str, field: dataclasses.Field, group: str) -> None:
    """One flag from a config field: its default, help and choices, in its --helpfull group."""
    meta, module = field.metadata, f"launch.py {group}"
    kind = next((t for t in (bool, int, float) if field.type in (t, t.__name__)), str)
    if meta["choices"]:
        flags.DEFINE_enum(
            name, field.default, list(meta["choices"]), meta["help"], module_name=module
        )
    else:
        _KINDS.get(kind, flags.DEFINE_string)(name, field.default, meta["help"], module_name=module)


for _name, (_group, _field) in C.FIELDS.items():
    _define(_name, _field, _group)
flags.DEFINE_enum(
    "preset",
    "auto",
    ["auto", *sorted(C.PRESETS)],
    "auto: toy with the toy pack (--model toy), else paper (the defaults); fast and preview "
    "are toy_fast and toy_preview with the toy pack. Values: "
    + "; ".join(
        f"{name}: "
        + (
            ", ".join(
                f"{k}={str(v).lower()}"
                if isinstance(v, bool)
                else f"{k}={v:g}"
                if not isinstance(v, str)
                else f"{k}={v}"
                for k, v in values.items()
            )
            or "the defaults"
        )
        for name, values in sorted(C.PRESETS.items())
    ),
    module_name="launch.py method",
)
_batch = dict(module_name="launch.py batch")
flags.DEFINE_string(
    "jobs",
    None,
    "Jobs file (JSONL, one edit per line, keys = these flag names plus name/preset/points): "
    "edits in batches sharded over the local devices; the other flags are every job's defaults.",
    **_batch,
)
flags.DEFINE_integer(
    "batch_size", 0, "Edits per batch with --jobs (0: one per local device).", **_batch
)
flags.DEFINE_string(
    "coordinator",
    None,
    "host:port of process 0, for several processes (hosts) on one --jobs run; automatic on a "
    "Cloud TPU pod slice.",
    **_batch,
)
flags.DEFINE_integer("num_processes", 1, "Processes in the run (with --coordinator).", **_batch)
flags.DEFINE_integer(
    "process_id", 0, "This process's id, 0 .. num_processes - 1 (with --coordinator).", **_batch
)
_serve = dict(module_name="launch.py editor")
flags.DEFINE_bool(
    "serve",
    False,
    "Serve the browser motion editor (docs/editor.md) with these model and guidance flags; "
    "its runs go to --out_dir (default runs/editor).",
    **_serve,
)
flags.DEFINE_integer("port", 8765, "The editor's port (with --serve).", **_serve)
flags.DEFINE_string(
    "host",
    "127.0.0.1",
    "The editor's address (with --serve); other than loopback it is reachable by others and "
    "needs a token (printed in the URL).",
    **_serve,
)
flags.DEFINE_list(
    "allowed_hosts",
    [],
    "Host names the editor answers to besides loopback names and --host (e.g. a name that "
    "reaches this machine); requests naming any other host are refused.",
    **_serve,
)
flags.DEFINE_string(
    "token",
    None,
    "The editor's token (with --serve); one is generated when --host is not loopback.",
    **_serve,
)
_LIMIT_HELP = {
    "max_queue": "Edits that may wait in the editor's queue; one more is refused.",
    "max_uploads": "Images and masks the editor keeps; the least recently used go first.",
    "upload_store_mb": "Megabytes of images and masks the editor keeps.",
    "min_free_disk_mb": "Free megabytes under --out_dir the editor needs to start a run.",
    "max_event_streams": "Progress streams the editor keeps open at once.",
}
for _field in dataclasses.fields(Limits):
    flags.DEFINE_integer(_field.name, _field.default, _LIMIT_HELP[_field.name], **_serve)
FLAGS = flags.FLAGS
for _name in [
    *C.FIELDS,
    "preset",
    "jobs",
    "batch_size",
    "coordinator",
    "num_processes",
    "process_id",
    "serve",
    "port",
    "host",
    "allowed_hosts",
    "token",
    *_LIMIT_HELP,
]:
    flags.declare_key_flag(_name)  # --helpshort lists them all


def explicit_values() -> dict:
    """The config fields given explicitly on the command line."""
    return {name: FLAGS[name].value for name in C.FIELDS if FLAGS[name].present}


def configuration() -> C.Config:
    """The Config of the command line: default < preset < explicit flags."""
    try:
        return C.resolve(explicit_values(), FLAGS.preset)
    except ValueError as e:
        raise InputError(str(e)) from None


def parse_flags(argv: list[str]) -> list[str]:
    """The command line's flags parsed into FLAGS; a value absl refuses (a word for a number, an
    unknown flag or choice) is a bad input: one `error:` line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        message = " ".join(str(e).split())
        print(f"error: {message}; see python launch.py --helpshort", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> None:
    logging.set_verbosity(logging.WARNING)
    without_torch()  # mgjax runs on JAX alone: a start without PyTorch's import

    if len(sys.argv) == 1:  # no flags at all: say what this is and how to ask for more
        print(__doc__.strip())
        print("\nAll flags: python launch.py --helpshort (by group: --helpfull)")
        return

    def run_command() -> None:
        if len(argv) > 1:
            raise InputError(f"unexpected arguments {argv[1:]}; see --help")
        log = lambda s: print(s, flush=True)  # noqa: E731
        try:
            if FLAGS.serve:
                from mgjax.editor.app import serve

                if FLAGS.jobs:
                    raise InputError("--serve and --jobs exclude each other")
                launcher = os.path.abspath(__file__)
                limits = Limits(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Limits)})
                serve(
                    explicit_values(),
                    FLAGS.preset,
                    FLAGS.host,
                    FLAGS.port,
                    launcher,
                    log,
                    tuple(FLAGS.allowed_hosts),
                    FLAGS.token,
                    limits,
                )
                return
            if FLAGS.jobs:
                from mgjax.batch import run as batch
                from mgjax.batch import sharding, summary

                sharding.initialize_distributed(
                    FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id
                )
                import jax

                rows = batch.run_jobs(
                    FLAGS.jobs,
                    explicit_values(),
                    FLAGS.batch_size,
                    log,
                    jax.process_index(),
                    jax.process_count(),
                    preset=FLAGS.preset,
                )
                summary.report(rows, log)
                if any(r["status"] != "done" for r in rows):
                    sys.exit(3)  # the summary names the jobs that did not finish
                return
            from mgjax.edit.workflow import run

            config = configuration()
            if not config.output.out_dir:
                raise InputError("--out_dir is required")
            run(config, log=log)
        except KeyboardInterrupt:
            sys.exit(130)

    run_cli(run_command)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)

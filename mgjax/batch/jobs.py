"""Jobs files: one edit per line, as a JSON object of launch.py's flag names.

A jobs file has one JSON object per line (blank lines and lines starting with # are skipped).
Its keys are launch.py's flag names (`image`, `prompt`, `seed`, `motion`, `object_mask`,
`guidance_weight`, ...); each job's configuration is mgjax.config.resolve(the command line's
explicit flags, its preset, the job line). The extra keys are `name` (its output folder,
default job_00000, ...), `preset` (replaces the command line's preset for that job) and
`points` (drag pairs [[[x, y], [X, Y]], ...], the same as `drag`). A bad line is an invalid
job, reported in the summary; it never ends the run. The file is UTF-8 (a byte order mark at
its start is skipped).
"""

import dataclasses
import json
import os
import re

from flow.errors import InputError
from mgjax import config as C

# Keys a job line may not give: the run-level settings, and num_samples (one job, one image).
NOT_PER_JOB = (*C.RUN_LEVEL, "num_samples")
JOB_ONLY = ("name", "preset", "points")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the whole name: fullmatch
MAX_FILE_BYTES = 256 * 2**20  # a larger jobs file (or an endless stream) is refused
_SHOWN = 80  # characters of a bad value that an error message quotes


@dataclasses.dataclass
class Job:
    index: int  # position among the jobs (0-based)
    name: str
    line: int  # line number in the jobs file
    config: C.Config | None
    status: str = "pending"  # pending | done | invalid | diverged | failed
    error: str | None = None
    metrics: dict | None = None


def points_to_drag(points) -> str:
    """[[[x, y], [X, Y]], ...] -> the --drag string "x,y>X,Y; ..."."""
    try:
        pairs = [(tuple(map(float, h)), tuple(map(float, t))) for h, t in points]
        if not pairs or any(len(h) != 2 or len(t) != 2 for h, t in pairs):
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise InputError(
            f"points must be [[[x, y], [X, Y]], ...] (handle, target pairs), got {_shown(points)}"
        ) from None
    return "; ".join(f"{h[0]:g},{h[1]:g}>{t[0]:g},{t[1]:g}" for h, t in pairs)


def _shown(value) -> str:
    """repr(value), cut to _SHOWN characters (a message stays one short line)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's digit limit for str()
        text = f"<a {type(value).__name__} too long to show>"
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _one_line(message: str) -> str:
    """The message with control characters (newlines, escapes) written as escapes, cut short."""
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return out if len(out) <= 4 * _SHOWN else out[: 4 * _SHOWN - 3] + "..."


def _read_lines(path: str) -> list[str]:
    """The file's lines (split at "\\n" only, as editors number them), read up to
    MAX_FILE_BYTES; a UTF-8 byte order mark at the start is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise InputError(
                f"--jobs {path}: larger than {MAX_FILE_BYTES // 2**20} MB; split it into "
                "several jobs files"
            )
        text = data.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--jobs {path}: cannot read it ({e})") from None
    return [line.removesuffix("\r") for line in text.split("\n")]


def _parse(line: str) -> dict:
    """A line's JSON object; an InputError for anything else."""
    try:
        spec = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"not JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError("nested too deep; a job is one flat JSON object") from None
    except ValueError as e:  # an integer past Python's digit limit, ...
        raise InputError(f"not JSON that can be read ({str(e).split(';')[0]})") from None
    if not isinstance(spec, dict):
        raise InputError('a job is a JSON object, e.g. {"image": "a.png", ...}')
    return spec


def _invalid(index: int, name: str, number: int, message: str, seen: set[str]) -> Job:
    seen.add(name)
    return Job(index, name, number, None, "invalid", f"line {number}: {_one_line(message)}")


def read_jobs(path: str, explicit: dict, preset: str = "auto") -> list[Job]:
    """Parse a jobs file against the command line's explicit values and preset (a job's config
    is mgjax.config.resolve(explicit, preset, job line)). A bad line becomes an invalid job
    (reported, skipped), not an error of the whole run; a file that cannot be read is one."""
    lines = _read_lines(path)
    out_dir = explicit.get("out_dir") or ""
    jobs: list[Job] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        index = len(jobs)
        name = f"job_{index:05d}"
        try:
            spec = _parse(line)
            given = spec.pop("name", name)
            if not isinstance(given, str) or not _NAME.fullmatch(given):
                raise InputError(f"name {_shown(given)}: letters, digits, '.', '_' and '-' only")
            name = given
            if name in seen:
                raise InputError(f"name {name!r} is used by an earlier job")
            seen.add(name)
            run_level = sorted(set(spec) & set(NOT_PER_JOB))
            if run_level:
                raise InputError(f"{run_level} belong to the whole run: give them as flags")
            unknown = sorted(set(spec) - set(C.FIELDS) - set(JOB_ONLY))
            if unknown:
                raise InputError(
                    f"unknown key(s) {_shown(unknown)}; job keys are launch.py's flag names"
                )
            if "points" in spec:
                if "drag" in spec:
                    raise InputError("give points or drag, not both")
                spec["drag"] = points_to_drag(spec.pop("points"))
            try:
                config = C.resolve(explicit, preset, spec)
                config = C.replace(config, out_dir=os.path.join(out_dir, name), num_samples=1)
            except ValueError as e:
                raise InputError(str(e)) from None
            jobs.append(Job(index, name, number, config))
        except InputError as e:
            jobs.append(_invalid(index, name, number, str(e), seen))
        except RecursionError:
            jobs.append(_invalid(index, name, number, "nested too deep", seen))
        except OverflowError as e:
            text = f"a number is too large ({e})"
            jobs.append(_invalid(index, name, number, text, seen))
        except Exception as e:  # noqa: BLE001 - a value of the wrong kind deep in the line
            text = f"a value cannot be used ({type(e).__name__}: {e})"
            jobs.append(_invalid(index, name, number, text, seen))
    if not jobs:
        raise InputError(f"--jobs {path}: no jobs in it (one JSON object per line)")
    return jobs

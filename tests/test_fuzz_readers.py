"""Every reader of untrusted structured data, fuzzed with Hypothesis: contents that are
well-formed (valid JSON, valid pickles, valid .npy/.pth files) but of the wrong shape (a list
where an object was expected, a missing key, text where numbers were, nesting thousands deep).
Each reader either works or raises exactly one InputError of one line, with nothing written;
never another exception, never a RecursionError, never advice to unpickle.

`python -m pytest tests/test_fuzz_readers.py -s` prints, per reader, the examples run and the
outcomes."""

import collections
import json
import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from flow.errors import InputError

FAST = settings(
    max_examples=int(os.environ.get("MGJAX_FUZZ_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
OUTCOMES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
UNPICKLE_ADVICE = ("weights_only=False", "allow_pickle=True", "pickle.load", "torch.load(")


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for reader, counts in sorted(OUTCOMES.items()):
        total = sum(counts.values())
        print(f"\nfuzz {reader}: {total} examples, {dict(counts)}")


def outcome(reader: str, call, written=lambda: []) -> None:
    """Run `call`: it works, or raises one one-line InputError and `written()` is empty."""
    try:
        call()
    except InputError as e:
        message = str(e)
        assert "\n" not in message and message, message
        assert not any(a in message for a in UNPICKLE_ADVICE), message
        assert written() == [], (message, written())
        OUTCOMES[reader]["InputError"] += 1
        return
    OUTCOMES[reader]["works"] += 1


# ------------------------------------------------------------------ value strategies

scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=8)
)
json_values = st.recursive(
    scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
arrays = st.builds(
    lambda shape, dtype, seed: np.random.default_rng(seed).integers(0, 3, shape).astype(dtype),
    st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    st.sampled_from(["uint8", "int64", "float32", "float64", "bool"]),
    st.integers(0, 2**16),
)


def deep(depth: int, leaf=0):
    """A list nested `depth` deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


deeply_nested = st.integers(100, 5000).map(deep)
py_values = (
    st.recursive(
        scalars | arrays,
        lambda c: (
            st.lists(c, max_size=4)
            | st.tuples(c, c)
            | st.dictionaries(st.text(max_size=6), c, max_size=4)
        ),
        max_leaves=10,
    )
    | deeply_nested
)


def ls(folder: str) -> list[str]:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.fixture
def scratch():
    folder = tempfile.mkdtemp(prefix="mgjax-fuzz-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def fresh(scratch: str, name: str) -> str:
    path = os.path.join(scratch, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


# ------------------------------------------------------------------ .mgjax headers

headers = json_values | st.fixed_dictionaries(
    {
        "format": st.just("mgjax-raft") | json_values,
        "version": st.just(1) | json_values,
        "small": st.booleans() | json_values,
    },
    optional={"input_scale": st.integers(-2, 3) | json_values, "source": json_values},
)


@FAST
@given(header=headers | deeply_nested)
def test_mgjax_headers(scratch, header):
    from flow import checkpoint

    text = json.dumps(header).encode() if not isinstance(header, list) else _dumps_deep(header)
    path = _header_file(fresh(scratch, "h"), text)
    outcome(".mgjax header", lambda: checkpoint.load_variables(path))


def _header_file(folder: str, text: bytes) -> str:
    """A .mgjax file in `folder` holding only the header `text`."""
    from flow import checkpoint

    path = os.path.join(folder, "w.mgjax")
    with open(path, "wb") as f:
        np.savez(f, **{checkpoint._META: np.frombuffer(text, np.uint8)})
    return path


# the header passes when its arrays are what fail ("does not match": it holds none)
@pytest.mark.parametrize(
    "input_scale, refusal",
    [(None, "does not match"), (1, "does not match"), (0, "input_scale"), ("2", "input_scale"),
     (2.5, "input_scale"), (True, "input_scale")],
)  # fmt: skip
def test_mgjax_header_input_scale(scratch, input_scale, refusal):
    """A header's optional input_scale: null reads as absent (1); a value that is not an
    integer of at least 1 is one InputError."""
    from flow import checkpoint
    from flow.errors import InputError

    header = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "small": True,
              "input_scale": input_scale}  # fmt: skip
    path = _header_file(fresh(scratch, "s"), json.dumps(header).encode())
    with pytest.raises(InputError, match=refusal):
        checkpoint.load_variables(path)


def _dumps_deep(value) -> bytes:
    try:
        return json.dumps(value).encode()
    except RecursionError:
        depth = 0
        while isinstance(value, list) and value:
            value, depth = value[0], depth + 1
        return b"[" * depth + b"0" + b"]" * depth


# ------------------------------------------------------------------ .pth pickles


@FAST
@given(value=py_values)
def test_pth_state_dicts(scratch, value):
    torch = pytest.importorskip("torch")
    from flow import checkpoint
    from flow.pth import read_state_dict

    def to_torch(v):  # arrays become tensors; deep nesting is kept as it is
        if isinstance(v, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(v))
        if isinstance(v, dict):
            return {k: to_torch(x) for k, x in v.items()}
        if isinstance(v, list | tuple) and _depth(v) < 50:
            return type(v)(to_torch(x) for x in v)
        return v

    path = os.path.join(fresh(scratch, "p"), "w.pth")
    try:
        torch.save(to_torch(value), path)
    except (RecursionError, pickle.PicklingError):
        return
    outcome(".pth state dict", lambda: read_state_dict(path))
    outcome(".pth RAFT checkpoint", lambda: checkpoint.read_torch_checkpoint(path))


def _depth(value) -> int:
    depth = 0
    while isinstance(value, list | tuple) and value:
        value, depth = value[0], depth + 1
    return depth


# ------------------------------------------------------------------ DragBench metadata

metas = (
    st.fixed_dictionaries(
        {
            "prompt": st.text(max_size=10) | py_values,
            "points": st.lists(st.lists(st.integers(0, 63), min_size=2, max_size=2), max_size=4)
            | py_values,
            "mask": arrays | py_values | st.just(np.ones((8, 8), np.uint8)),
        }
    )
    | py_values
)


@FAST
@given(meta=metas, protocol=st.integers(2, 5))
@example(meta={"prompt": "a", "points": [[1, 2], [3, 4]], "mask": np.ones((8, 8))}, protocol=4)
def test_dragbench_metadata(scratch, meta, protocol):
    from PIL import Image

    from mgjax.evaluation import dragbench

    root = fresh(scratch, "bench")
    sample = os.path.join(root, "cat", "s0")
    os.makedirs(sample)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(sample, "original_image.png"))
    try:
        data = pickle.dumps(meta, protocol=protocol)
    except RecursionError:
        return
    with open(os.path.join(sample, "meta_data.pkl"), "wb") as f:
        f.write(data)
    out = fresh(scratch, "out")
    jobs = os.path.join(out, "jobs.jsonl")
    outcome("DragBench meta_data.pkl", lambda: dragbench.to_jobs(root, jobs), lambda: ls(out))


# ------------------------------------------------------------------ the authors' folders


@FAST
@given(
    flow=st.just(np.zeros((1, 2, 16, 16), np.float32)) | py_values,
    mask=st.just(np.zeros((1, 4, 2, 2), bool)) | py_values,
    latents=st.lists(st.just(np.zeros((1, 4, 2, 2), np.float32)) | arrays, max_size=3),
)
def test_authors_folders(scratch, flow, mask, latents):
    torch = pytest.importorskip("torch")
    from PIL import Image

    from mgjax.edit.reference import read_reference_folder

    folder = fresh(scratch, "ref")
    os.makedirs(os.path.join(folder, "flows"))
    os.makedirs(os.path.join(folder, "latents"))
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(folder, "pred.png"))

    def save(value, *parts):
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        try:
            torch.save(value, os.path.join(folder, *parts))
        except (RecursionError, pickle.PicklingError):
            torch.save(0, os.path.join(folder, *parts))

    save(flow, "flows", "f.pth")
    save(mask, "flows", "f.mask.pth")
    for i, z in enumerate(latents):
        save(z, "latents", f"zt.{i:05d}.pth")
    outcome("authors' folder", lambda: read_reference_folder(folder, "f.pth", "f.mask.pth"))


# ------------------------------------------------------------------ jobs files

job_lines = json_values | st.dictionaries(
    st.sampled_from(
        [
            "image",
            "prompt",
            "motion",
            "drag",
            "points",
            "seed",
            "steps",
            "preset",
            "name",
            "object_box",
            "guidance_weight",
        ]
    ),
    json_values,
    max_size=5,
)


@FAST
@given(lines=st.lists(job_lines | deeply_nested, min_size=1, max_size=4))
def test_jobs_files(scratch, lines):
    from mgjax.batch.jobs import read_jobs

    path = os.path.join(fresh(scratch, "jobs"), "jobs.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(_dumps_deep(line).decode() for line in lines) + "\n")
    outcome("jobs file", lambda: read_jobs(path, {"out_dir": "runs"}, "auto"))


# ------------------------------------------------------------------ config.json for evaluation

configs = json_values | st.fixed_dictionaries(
    {},
    optional={
        "raft_weights": json_values | st.just("w.mgjax"),
        "drag": json_values | st.just("1,1>2,2"),
    },
)


@FAST
@given(config=configs | deeply_nested)
def test_evaluation_configs(scratch, config):
    from mgjax.evaluation.evaluate import evaluate_sample

    folder = fresh(scratch, "sample")
    with open(os.path.join(folder, "config.json"), "wb") as f:
        f.write(_dumps_deep(config))
    outcome("evaluate config.json", lambda: evaluate_sample(folder, None, None, 1))


# ------------------------------------------------------------------ flow files


@FAST
@given(
    value=py_values,
    kind=st.sampled_from([".npy", ".pth", ".flo"]),
    header=st.binary(min_size=12, max_size=12),
)
def test_flow_files(scratch, value, kind, header):
    torch = pytest.importorskip("torch")
    from mgjax.edit.readers import read_flow_file, read_frozen

    path = os.path.join(fresh(scratch, "flow"), "f" + kind)
    if kind == ".npy":
        array = value if isinstance(value, np.ndarray) else np.zeros((4, 4, 2), np.float32)
        np.save(path, array)
    elif kind == ".pth":
        try:
            v = (
                torch.from_numpy(np.ascontiguousarray(value))
                if isinstance(value, np.ndarray)
                else value
            )
            torch.save(v, path)
        except (RecursionError, pickle.PicklingError):
            return
    else:
        with open(path, "wb") as f:
            f.write(
                b"\x00\x00\x00\x00"
                if not header
                else np.float32(202021.25).tobytes() + header[4:12] + header
            )
    outcome("flow file", lambda: read_flow_file(path, 4, 4))
    if kind != ".flo":
        outcome("frozen mask file", lambda: read_frozen(path, (1, 4, 2, 2), 2))


# ------------------------------------------------------------------ the editor's JSON bodies

bodies = json_values | st.dictionaries(
    st.sampled_from(
        [
            "image",
            "prompt",
            "mask",
            "box",
            "motion",
            "drag",
            "preset",
            "steps",
            "seed",
            "guidance_weight",
            "num_samples",
            "recursive_steps",
        ]
    ),
    json_values | st.just("translate:1,0") | st.just("1,1,9,9"),
    max_size=6,
)


@FAST
@given(
    body=bodies | deeply_nested,
    route=st.sampled_from(["/api/preview", "/api/run", "/api/scene", "/api/generate"]),
)
def test_editor_bodies(tmp_path, body, route):
    from tests.test_editor_guard import make

    ed = _EDITOR.get("editor") or _EDITOR.setdefault("editor", make(tmp_path))
    before = ls(ed.out_root)
    text = _dumps_deep(body)
    r = ed.client.post(route, content=text, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (route, body, r.text)
    if r.status_code >= 400:
        message = r.json()["error"]
        assert "\n" not in message and message
        assert ls(ed.out_root) == before
        OUTCOMES["editor JSON body"]["InputError"] += 1
    else:
        OUTCOMES["editor JSON body"]["works"] += 1


_EDITOR: dict = {}


def teardown_module():
    if "editor" in _EDITOR:
        _EDITOR["editor"].worker.close()

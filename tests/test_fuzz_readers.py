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


# ------------------------------------------------------------------ files that lie about sizes


def _refused(call, *words, megabytes: float = 64.0) -> str:
    """The one-line InputError `call` raises with little memory (what it declares is never
    read or allocated) and no warnings."""
    import tracemalloc
    import warnings

    tracemalloc.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(InputError) as e:
                call()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    message = str(e.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert peak < megabytes * 2**20, (peak, message)
    return message


def _flo(path, width: int, height: int, size: int | None = None) -> str:
    """A .flo file whose header declares width x height, `size` bytes long (sparse)."""
    with open(path, "wb") as f:
        f.write(np.float32(202021.25).tobytes() + np.array([width, height], "<i4").tobytes())
        f.truncate(12 + 8 * max(width * height, 0) if size is None else size)
    return str(path)


def test_flo_sizes_checked_before_reading(tmp_path):
    """A .flo is read only when its real size is exactly what its header declares, and only
    a regular file is opened: a sparse 3 GB file, a device, a pipe and a folder are refused
    at once, as are headers declaring no pixels or more than an image may have."""
    from flow.flo import read_flo

    assert read_flo(_flo(tmp_path / "ok.flo", 3, 2)).shape == (2, 3, 2)
    _refused(lambda: read_flo(_flo(tmp_path / "big.flo", 64, 64, 3 * 2**30)), "big.flo", "trailing")
    _refused(lambda: read_flo(_flo(tmp_path / "short.flo", 64, 64, 100)), "truncated")
    for w, h in [(0, 0), (-1, 4), (2**31 - 1, 2**31 - 1), (70000, 70000)]:
        path = _flo(tmp_path / "h.flo", w, h, 12)
        _refused(lambda p=path: read_flo(p), "h.flo", "corrupt .flo header")
    os.symlink("/dev/zero", tmp_path / "zero.flo")
    _refused(lambda: read_flo(tmp_path / "zero.flo"), "zero.flo", "pipe or device")
    os.mkfifo(tmp_path / "fifo.flo")
    _refused(lambda: read_flo(tmp_path / "fifo.flo"), "fifo.flo", "pipe or device")
    os.mkdir(tmp_path / "dir.flo")
    _refused(lambda: read_flo(tmp_path / "dir.flo"), "dir.flo", "folder")
    _refused(lambda: read_flo(tmp_path / "none.flo"), "no such .flo file")


def test_npy_overflowing_shape_names_its_size(tmp_path):
    """An .npy header whose shape's product overflows 64 bits is refused with the size it
    really declares, never mistaken for an empty array."""
    from flow.files import load_npy

    path = tmp_path / "o.npy"
    np.save(path, np.zeros(2, np.float32))
    text = path.read_bytes().replace(b"(2,)", b"(4611686018427387904, 4)")
    header_len = text.index(b"\n") + 1
    pad = 64 - header_len % 64
    path.write_bytes(text[: header_len - 1] + b" " * pad + b"\n" + text[header_len:])
    message = _refused(lambda: load_npy(str(path), "flow"), "o.npy")
    assert f"{4611686018427387904 * 4 * 4:,}" in message


# ------------------------------------------------------------------ .mgjax weights, by member


def _raft_copy(path, replace: dict, compress: int = 0) -> str:
    """The toy pack's RAFT weights with members replaced ({member: bytes}, None = drop)."""
    import zipfile

    from mgjax.toy import pack

    with zipfile.ZipFile(pack.PACK / "raft-small.mgjax") as src:
        members = {n: src.read(n) for n in src.namelist()}
    members.update(replace)
    with zipfile.ZipFile(path, "w", compress or zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            if data is not None:
                z.writestr(name, data)
    return str(path)


def _npy_bytes(array: np.ndarray, shape=None, tail: bytes = b"") -> bytes:
    """`array` as .npy bytes, its header declaring `shape` if given, `tail` appended."""
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    data = buf.getvalue()
    if shape is not None:
        old = repr(array.shape).encode()
        new = repr(tuple(shape)).encode()
        end = data.index(b"\n") + 1
        head = data[:end].replace(old, new).rstrip(b" \n")
        head += b" " * (end - 1 - len(head)) + b"\n"
        assert len(head) == end, "the new shape must fit the header's padding"
        data = head + data[end:]
    return data + tail


BIAS = "params/cnet/conv1/bias.npy"  # a (32,) float32 tensor of RAFT-small


@pytest.mark.parametrize(
    "member, words",
    [
        (_npy_bytes(np.zeros(32, np.float32), (100000, 100000, 2)), "(100000, 100000, 2)"),
        (_npy_bytes(np.zeros(32, np.float32), (2**62, 4)), "has shape"),
        (_npy_bytes(np.zeros(16, np.float32)), "has shape (16,), want (32,)"),
        (_npy_bytes(np.array(["abc"] * 32)), "<U3"),
        (_npy_bytes(np.zeros(32, np.complex64)), "complex64"),
        (_npy_bytes(np.zeros(32, np.int32)), "int32"),
        (_npy_bytes(np.zeros(32, "V4")), "V4"),
        (_npy_bytes(np.full(32, np.nan, np.float32)), "NaN or inf"),
        (_npy_bytes(np.full(32, 1e300)), "NaN or inf"),
        (_npy_bytes(np.zeros(32, np.float32), tail=b"\0" * 4096), "declares 128 bytes"),
        (_npy_bytes(np.zeros(32, np.float32))[:100], "is unreadable"),
        (b"not an npy", "is unreadable"),
    ],
    ids=["huge", "overflow", "wrong-shape", "strings", "complex", "ints", "void", "nan",
         "beyond-f32", "longer", "truncated", "not-npy"],
)  # fmt: skip
def test_mgjax_tensors_checked_before_reading(tmp_path, member, words):
    """Each tensor's .npy header must declare real floats of the shape RAFT gives it before any
    of its data is read; its data must be exactly that many bytes, and finite. Every message
    names the file."""
    from flow import checkpoint

    path = _raft_copy(tmp_path / "w.mgjax", {BIAS: member})
    _refused(lambda: checkpoint.load_variables(path), "w.mgjax", words)


def test_mgjax_float64_tensors_read(tmp_path):
    """Real floats of another width are read as float32."""
    from flow import checkpoint

    value = np.linspace(-1, 1, 32)
    path = _raft_copy(tmp_path / "w.mgjax", {BIAS: _npy_bytes(value)})
    variables, _ = checkpoint.load_variables(path)
    got = variables["params"]["cnet"]["conv1"]["bias"]
    assert got.dtype == np.float32 and np.allclose(got, value)


def test_mgjax_names_checked_before_inflating(tmp_path):
    """An unexpected member (here 128 MB of deflated zeros) is refused from the zip's directory
    alone, without inflating it; a missing one, a header too big or of the wrong type, and a
    member that is not an .npy are refused too, each naming the file."""
    import zipfile

    from flow import checkpoint

    bomb = _raft_copy(
        tmp_path / "bomb.mgjax", {"bomb.npy": bytes(128 * 2**20)}, zipfile.ZIP_DEFLATED
    )
    with zipfile.ZipFile(bomb) as z:
        assert z.getinfo("bomb.npy").compress_size < 2**20
    words = ("bomb.mgjax", "unexpected ['bomb']")
    _refused(lambda: checkpoint.load_variables(bomb), *words, megabytes=32)
    gone = _raft_copy(tmp_path / "gone.mgjax", {BIAS: None})
    _refused(lambda: checkpoint.load_variables(gone), "gone.mgjax", "missing ['params/cnet")
    odd = _raft_copy(tmp_path / "odd.mgjax", {"readme.txt": b"hi"})
    _refused(lambda: checkpoint.load_variables(odd), "odd.mgjax", "'readme.txt'")
    meta = f"{checkpoint._META}.npy"
    big = _raft_copy(tmp_path / "big.mgjax", {meta: _npy_bytes(np.zeros(2**20, np.uint8))})
    _refused(lambda: checkpoint.load_variables(big), "big.mgjax", "more than a header's")
    floats = _raft_copy(tmp_path / "f.mgjax", {meta: _npy_bytes(np.zeros(4, np.float32))})
    _refused(lambda: checkpoint.load_variables(floats), "f.mgjax", "float32")
    scale = {"format": "mgjax-raft", "version": 1, "small": True, "input_scale": 10**400}
    text = np.frombuffer(json.dumps(scale).encode(), np.uint8)
    huge = _raft_copy(tmp_path / "s.mgjax", {meta: _npy_bytes(text)})
    message = _refused(lambda: checkpoint.load_variables(huge), "s.mgjax", "input_scale")
    assert len(message) < 300


def test_run_folder_npz_checked(tmp_path):
    """A resumed run's own .npz files (checkpoint, source cache) are read by the same rules:
    only their own arrays, no more bytes than the file holds, finite values."""
    import zipfile

    from mgjax.edit import trajectory
    from mgjax.edit.checkpoint import Checkpoint

    cache = tmp_path / "source.npz"
    np.savez(
        cache,
        image=np.zeros((1, 8, 8, 3)),
        z_T=np.zeros((1, 4, 1, 1)),
        latents=np.zeros((2, 1, 4, 1, 1)),
    )
    assert [a.shape for a in trajectory._read_cache(str(cache))][0] == (1, 8, 8, 3)
    np.savez(cache, image=np.zeros((1, 8, 8, 3)), z_T=np.zeros((1, 4, 1, 1)), evil=np.zeros(1))
    _refused(lambda: trajectory._read_cache(str(cache)), "source.npz", "not ['image'")
    with zipfile.ZipFile(cache, "w") as z:
        z.writestr("image.npy", _npy_bytes(np.zeros(4, np.float32), (2**20, 2**20, 3, 1)))
        z.writestr("z_T.npy", _npy_bytes(np.zeros((1, 4, 1, 1))))
        z.writestr("latents.npy", _npy_bytes(np.zeros((2, 1, 4, 1, 1))))
    _refused(lambda: trajectory._read_cache(str(cache)), "source.npz", "bytes it can hold")
    np.savez(
        cache,
        image=np.full((1, 8, 8, 3), np.inf),
        z_T=np.zeros((1, 4, 1, 1)),
        latents=np.zeros((2, 1, 4, 1, 1)),
    )
    _refused(lambda: trajectory._read_cache(str(cache)), "source.npz", "NaN or inf")

    ckpt = tmp_path / "checkpoint.npz"
    np.savez(
        ckpt,
        z=np.zeros((1, 4, 2, 2), np.float32),
        step=np.asarray(3),
        keys=np.zeros((1, 2), np.uint32),
        digest=np.asarray("abc"),
    )
    assert Checkpoint(str(ckpt), "abc").step() == 3
    np.savez(
        ckpt,
        z=np.zeros(1),
        step=np.asarray(3),
        keys=np.zeros(1),
        digest=np.asarray("abc"),
        evil=np.zeros(1),
    )
    _refused(lambda: Checkpoint(str(ckpt), "abc").step(), "checkpoint.npz", "not a checkpoint")
    np.savez(ckpt, z=np.zeros(1), step=np.asarray(3.5), keys=np.zeros(1), digest=np.asarray("abc"))
    _refused(lambda: Checkpoint(str(ckpt), "abc").step(), "checkpoint.npz", "float64")


# ------------------------------------------------------------------ configs nested deep


def test_deep_model_configs(tmp_path):
    """A model folder's config.json nested 100,000 deep is one InputError naming it; a run
    folder's marker nested that deep reads as no digest."""
    from mgjax.edit import rundir
    from mgjax.model import modelinfo

    for part in ("vae", "unet"):
        os.makedirs(tmp_path / part)
        (tmp_path / part / "config.json").write_text("{}")
    (tmp_path / "vae" / "config.json").write_text("[" * 100000 + "]" * 100000)
    _refused(lambda: modelinfo.geometry(str(tmp_path)), "vae/config.json", "nested too deep")
    (tmp_path / rundir.MARKER).write_text("[" * 100000 + "]" * 100000)
    assert rundir.digest_of(str(tmp_path)) is None
    (tmp_path / rundir.MARKER).write_text('{"digest": [1]}')
    assert rundir.digest_of(str(tmp_path)) is None


# ------------------------------------------------------------------ masks


def _mask_file(folder, name: str, pixels) -> str:
    from PIL import Image

    path = os.path.join(folder, name)
    if name.endswith(".npy"):
        np.save(path, pixels)
    elif isinstance(pixels, Image.Image):
        pixels.save(path)
    else:
        Image.fromarray(pixels).save(path)
    return path


def _masks():
    from PIL import Image

    square = np.zeros((16, 16), bool)
    square[4:12, 4:12] = True
    u8 = square.astype(np.uint8)
    aa = (u8 * 200).copy()
    aa[3, 4:12] = 60  # an anti-aliased edge stays outside
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[square] = (255, 0, 0)
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only on the object
    rgba[square, 3] = 255
    pal = Image.fromarray(u8 * 3).convert("P")
    return square, {
        "01.png": u8, "0255.png": u8 * 255, "aa.png": aa, "red.png": rgb, "rgba.png": rgba,
        "pal.png": pal, "16bit.png": (u8.astype(np.uint16) * 1000), "01.npy": u8,
        "bool.npy": square, "f.npy": square * np.float32(0.7), "rgb.npy": rgb,
    }  # fmt: skip


def test_masks_read_by_one_rule(tmp_path):
    """Object = the largest channel above half the mask's largest value: 0/1 and 0/255 masks,
    anti-aliased and coloured ones, palette, 16-bit and transparent ones all read as drawn."""
    from mgjax.edit.readers import read_mask_image

    square, masks = _masks()
    for name, pixels in masks.items():
        got = read_mask_image(_mask_file(tmp_path, name, pixels), 16, 16)
        assert np.array_equal(got, square), name


@pytest.mark.parametrize(
    "name, pixels, words",
    [("empty.png", np.zeros((16, 16), np.uint8), "the object mask is empty"),
     ("neg.npy", -np.ones((16, 16)), "the object mask is empty"),
     ("nan.npy", np.full((16, 16), np.nan), "NaN or inf"),
     ("clear.png", np.dstack([np.full((16, 16, 3), 255, np.uint8), np.zeros((16, 16), np.uint8)]),
      "the object mask is empty"),
     ("small.png", np.ones((8, 8), np.uint8), "mask is 8x8")],
)  # fmt: skip
def test_bad_masks(tmp_path, name, pixels, words):
    """An empty, non-finite or wrongly sized mask is one InputError naming the path given."""
    from mgjax.edit.readers import read_mask_image

    path = _mask_file(tmp_path, name, pixels)
    assert path in _refused(lambda: read_mask_image(path, 16, 16), words)


# ------------------------------------------------------------------ values out of range


@pytest.mark.parametrize(
    "array, words",
    [(np.full((16, 16, 2), 1e300), "NaN or inf"),
     (np.full((16, 16, 2), 1e30, np.float32), "at most 256"),
     (np.full((16, 16, 2), 2**62, np.int64), "at most 256"),
     (np.full((16, 16, 2), np.inf), "NaN or inf"),
     (np.zeros((16, 16, 2), np.complex64), "complex64")],
)  # fmt: skip
def test_flow_values_without_warnings(tmp_path, array, words):
    """Flow values that are not finite, do not fit float32 or move pixels absurdly far are one
    InputError, and numpy prints no warning first."""
    from mgjax.edit.readers import read_flow_file

    path = str(tmp_path / "f.npy")
    np.save(path, array)
    if array.dtype.kind == "c":  # load_npy refuses complex files itself
        words = "complex64"
    _refused(lambda: read_flow_file(path, 16, 16), "f.npy", words)


def test_schedule_values_without_warnings(tmp_path):
    from mgjax.edit.readers import read_schedule

    for values in ([1.0, np.inf], [1.0, 1e300], [np.nan, 1.0]):
        path = str(tmp_path / "s.npy")
        np.save(path, np.array(values))
        _refused(lambda p=path: read_schedule(p, 2), "s.npy", "NaN or inf")
    np.save(path, np.array([1.0, 2.0]))
    assert read_schedule(path, 2).dtype == np.float32


def test_cli_one_line(tmp_path):
    """launch.py on these files: one `error:` line each, exit status 2, no warning before it;
    a 0/1 label mask and a pure red mask are accepted (the run goes on to the bad schedule)."""
    import subprocess
    import sys

    from mgjax.toy import pack

    demo = pack.demo_files()
    sched = str(tmp_path / "sched.npy")
    np.save(sched, np.ones(3, np.float32))
    np.save(tmp_path / "big.npy", np.full((64, 64, 2), 1e300))
    np.save(tmp_path / "far.npy", np.full((64, 64, 2), 1e30, np.float32))
    np.save(tmp_path / "inf_sched.npy", np.array([np.inf] * 2))
    square, masks = _masks()
    _mask_file(tmp_path, "m01.png", np.kron(masks["01.png"], np.ones((4, 4), np.uint8)))
    _mask_file(tmp_path, "red.png", np.kron(masks["red.png"], np.ones((4, 4, 1), np.uint8)))
    base = ["--image", str(demo["image"]), "--prompt", "x", "--steps=2", "--compilation_cache="]
    schedule_error = "sched.npy: the guidance schedule has 3"
    move = ["--motion=translate:1,0", "--schedule", sched, "--object_mask"]
    cases = [
        (["--flow", str(tmp_path / "big.npy")], "big.npy: the flow contains NaN or inf"),
        (["--flow", str(tmp_path / "far.npy")], "far.npy: the flow moves pixels"),
        (["--flow", _flo(tmp_path / "s.flo", 64, 64, 2**30)], "s.flo: 1073709044 unexpected"),
        (["--motion=translate:1,0", "--schedule", str(tmp_path / "inf_sched.npy")], "NaN or inf"),
        ([*move, str(tmp_path / "m01.png")], schedule_error),
        ([*move, str(tmp_path / "red.png")], schedule_error),
    ]  # fmt: skip
    work = tmp_path / "work"
    work.mkdir()
    runs = [{"args": [*base, *a, f"--out_dir={work}/o"], "work": str(work)} for a, _ in cases]
    done = subprocess.run(
        [sys.executable, "-m", "tests.cli_runner", "launch"],
        input=json.dumps(runs), capture_output=True, text=True, timeout=300, check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )  # fmt: skip
    for (_, words), got in zip(cases, json.loads(done.stdout.splitlines()[-1]), strict=True):
        assert got["code"] == 2 and got["written"] == [], (words, got)
        lines = got["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines

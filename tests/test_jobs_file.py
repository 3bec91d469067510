"""The jobs file reader: every bad line is one invalid job with a one-line message, and the other
lines are read."""

import json
import os
import sys

import pytest

from flow.errors import InputError
from mgjax.batch import jobs as J
from mgjax.batch.jobs import read_jobs

BASE = dict(image="a.png", motion="translate:1,0")
GOOD = '{"name": "good", "seed": 3}'


def _read(tmp_path, lines, data: bytes | None = None):
    path = tmp_path / "jobs.jsonl"
    if data is None:
        data = ("\n".join([*lines, GOOD]) + "\n").encode()
    path.write_bytes(data)
    return read_jobs(str(path), dict(BASE, out_dir=str(tmp_path / "out")))


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"seed": 1' + "0" * 5000 + "}", "not JSON that can be read"),  # past the digit limit
        ('{"guidance_weight": 1' + "0" * 5000 + "}", "not JSON that can be read"),
        ("[" * 100000 + "]" * 100000, "nested too deep"),
        ('{"points": ' + "[" * 900 + "]" * 900 + "}", "points must be"),
        ('{"points": [[[1' + "0" * 400 + ", 0], [0, 0]]]}", "points must be"),
        ('{"points": {"a": 1}}', "points must be"),
        ('{"preset": [1]}', "preset"),
        ('{"preset": {"a": 1}}', "preset"),
        ('{"model": [1]}', "model"),
        ('{"seed": 1.5}', "seed"),
        ('{"steps": 1' + "0" * 400 + "}", "steps must be from 1 to 1000"),
        ('{"name": "abc\\n"}', "letters, digits"),
        ('{"name": "abc\\r"}', "letters, digits"),
        ('{"name": "a/b"}', "letters, digits"),
        ('{"name": "' + "x" * 5000 + '/"}', "letters, digits"),
        ('{"\\u0000": 1}', "unknown key"),
    ],
    ids=lambda v: v[:24].encode("unicode_escape").decode(),
)
def test_a_bad_line_is_one_invalid_job_and_the_others_are_read(tmp_path, line, message):
    jobs = _read(tmp_path, [line])
    assert [j.status for j in jobs] == ["invalid", "pending"]
    error = jobs[0].error
    assert error.startswith("line 1: ") and message in error, error
    assert error.isprintable() and len(error) < 400, error
    assert jobs[1].name == "good" and jobs[1].config.source.seed == 3


def test_any_exception_while_checking_a_line_is_that_line_s(tmp_path, monkeypatch):
    real = J.C.resolve

    def resolve(explicit, preset, job=None):
        if job and job.get("seed") == 13:
            raise TypeError("something deep refused the value")
        return real(explicit, preset, job)

    monkeypatch.setattr(J.C, "resolve", resolve)
    jobs = _read(tmp_path, ['{"seed": 13}'])
    assert [j.status for j in jobs] == ["invalid", "pending"]
    assert "something deep refused the value" in jobs[0].error


def test_a_name_ending_in_a_newline_is_refused(tmp_path):
    jobs = _read(tmp_path, [json.dumps({"name": "abc\n"})])
    assert jobs[0].status == "invalid" and "\n" not in jobs[0].error
    assert J._NAME.fullmatch("abc") and not J._NAME.fullmatch("abc\n")


def test_a_byte_order_mark_at_the_start_is_skipped(tmp_path):
    data = b"\xef\xbb\xbf" + b'{"name": "first"}\r\n' + GOOD.encode() + b"\r\n"
    jobs = _read(tmp_path, None, data)
    assert [(j.name, j.status) for j in jobs] == [("first", "pending"), ("good", "pending")]


def test_a_line_separator_inside_a_string_does_not_split_the_line(tmp_path):
    jobs = _read(tmp_path, [json.dumps({"name": "p", "prompt": "a\u2028b"}, ensure_ascii=False)])
    assert jobs[0].status == "pending" and jobs[0].config.source.prompt == "a\u2028b"
    assert jobs[1].line == 2


def test_an_endless_or_huge_file_is_refused_after_a_bounded_read(tmp_path, monkeypatch):
    monkeypatch.setattr(J, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.truncate(10 * 2**30)  # sparse: claims 10 GB
    with pytest.raises(InputError, match="larger than"):
        read_jobs(str(path), dict(BASE, out_dir=str(tmp_path / "out")))
    if os.path.exists("/dev/zero") and sys.platform.startswith("linux"):
        with pytest.raises(InputError, match="larger than"):
            read_jobs("/dev/zero", dict(BASE, out_dir=str(tmp_path / "out")))

"""Measures the errors of the parity tests: runs them under pytest and records, for every
comparison they make, what they measured against what they allow.

    python -m docs.measure_parity            # the tests listed in TESTS, a table on stdout
    python -m docs.measure_parity -k raft    # a subset (a pytest -k expression)

Comparisons seen: np.testing.assert_allclose (max abs difference, max difference relative to
the reference, and the tolerances), np.testing.assert_array_less (the measured value and its
bound) and the lines a test prints (relative L2 errors). docs/correctness.md quotes its output.
"""

import argparse
import sys

import numpy as np
import pytest

TESTS = [
    "tests/test_raft.py::test_flow_matches_torchvision_eval_mode",
    "tests/test_raft.py::test_context_norm_batch_matches_train_mode_one_image",
    "tests/test_raft.py::test_gradient_matches_torch_autograd_fp64",
    "tests/test_raft.py::test_cached_source_encoding_gives_the_same_flow_and_gradient",
    "tests/test_sampling.py::test_bilinear_sample_matches_grid_sample",
    "tests/test_sampling.py::test_warp_matches_grid_sample",
    "tests/test_ddim.py::test_schedule_and_step_match_diffusers",
    "tests/test_energy.py",
    "tests/test_sampler.py::test_seam_matches_torch_models",
    "tests/test_sampler.py::test_guided_steps_match_reference_transcription",
    "tests/test_sampler.py::test_zero_guidance_is_plain_ddim_and_diffusers_scheduler",
    "tests/test_sampler.py::test_inversion_then_sampling_reconstructs",
    "tests/test_sampler.py::test_ddim_schedule_indices_match_reference",
    "tests/test_pth.py",
]


class Recorder:
    """A pytest plugin: wraps numpy's comparisons and keeps what each test measured."""

    def __init__(self):
        self.current, self.rows, self.outcomes = None, {}, {}

    def _add(self, text: str) -> None:
        self.rows.setdefault(self.current, []).append(text)

    def pytest_runtest_setup(self, item):
        self.current = item.nodeid

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.nodeid] = report.outcome
        if report.when == "call":
            for line in report.capstdout.splitlines():
                if "err" in line or "parity" in line:
                    self._add(f"printed: {line.strip()}")

    def wrap(self, monkeypatch_target) -> None:
        allclose, less = np.testing.assert_allclose, np.testing.assert_array_less

        def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
            a = np.asarray(actual, np.float64)
            d = np.broadcast_to(np.asarray(desired, np.float64), a.shape)
            diff = np.abs(a - d)
            if diff.size:
                scale = np.abs(d).max() or 1.0
                self._add(
                    f"allclose: max abs {diff.max():.1e} ({diff.max() / scale:.1e} of the "
                    f"reference's largest value); allowed rtol {rtol:g}, atol {atol:g}"
                )
            return allclose(actual, desired, rtol, atol, *args, **kwargs)

        def assert_array_less(x, y, *args, **kwargs):
            x_ = np.asarray(x, np.float64)
            if x_.size == 1 and np.asarray(y).size == 1:
                self._add(f"less: measured {float(x_):.1e}, bound {float(np.asarray(y)):g}")
            return less(x, y, *args, **kwargs)

        monkeypatch_target.assert_allclose = assert_allclose
        monkeypatch_target.assert_array_less = assert_array_less


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="pytest -k expression")
    args = parser.parse_args(argv)
    recorder = Recorder()
    recorder.wrap(np.testing)
    extra = ["-k", args.k] if args.k else []
    code = pytest.main(["-q", "-p", "no:cacheprovider", *TESTS, *extra], plugins=[recorder])
    for test, outcome in recorder.outcomes.items():
        print(f"\n{test}: {outcome}")
        lines = recorder.rows.get(test, [])
        for line in sorted(set(lines), key=lines.index)[:12]:
            print(f"  {line}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main())

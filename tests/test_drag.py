"""Drag points to dense flow, against analytic motions."""

import numpy as np
import pytest

from flow.errors import InputError
from mgjax.edit.drag import drag_flow, fit_similarity, parse_drag
from mgjax.edit.motion import Motion, about, motion_flow, rotation


def _apply(matrix, pts):
    pts = np.asarray(pts, np.float64)
    return pts @ matrix[:2, :2].T + matrix[:2, 2]


def test_one_pair_is_a_translation_inside_the_mask():
    mask = np.zeros((40, 50), bool)
    mask[10:25, 5:30] = True
    h, t = parse_drag("12,15>20,11")
    flow = drag_flow(h, t, 40, 50, mask)
    np.testing.assert_array_equal(flow[mask], np.broadcast_to([8.0, -4.0], flow[mask].shape))
    assert not flow[~mask].any()


def test_two_pairs_give_the_rotation_and_scale_they_imply():
    m = about((30.0, 20.0), 1.25 * rotation(40.0))
    m[:2, 2] += (3.0, -2.0)
    handles = np.array([[22.0, 14.0], [41.0, 27.0]])
    text = "; ".join(f"{a:g},{b:g}>{c:.17g},{d:.17g}" for (a, b), (c, d) in
                     zip(handles, _apply(m, handles), strict=True))  # fmt: skip
    flow = drag_flow(*parse_drag(text), 48, 64)
    np.testing.assert_allclose(flow, motion_flow(Motion(m, ""), 48, 64), atol=1e-4)


def test_many_pairs_pass_exactly_through_the_points_and_recover_a_similarity():
    m = about((32.0, 24.0), 0.8 * rotation(-25.0))
    handles = np.array([[10.0, 12.0], [50.0, 8.0], [30.0, 40.0], [44.0, 30.0], [20.0, 30.0]])
    np.testing.assert_allclose(fit_similarity(handles, _apply(m, handles)), m, atol=1e-9)
    flow = drag_flow(handles, _apply(m, handles), 48, 64)  # residuals 0: the similarity itself
    np.testing.assert_allclose(flow, motion_flow(Motion(m, ""), 48, 64), atol=1e-4)
    rng = np.random.default_rng(0)
    targets = handles + rng.uniform(-6, 6, handles.shape)  # no similarity fits these
    flow = drag_flow(handles, targets, 48, 64)
    at = flow[handles[:, 1].astype(int), handles[:, 0].astype(int)]
    np.testing.assert_allclose(at, targets - handles, atol=1e-4)
    assert np.abs(np.diff(flow, axis=0)).max() < 3.0  # smooth between the points


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty"),
        ("1,2>3", "is not 'x,y>X,Y'"),
        ("1,2>3,4>5,6", "is not 'x,y>X,Y'"),
        ("a,2>3,4", "is not 'x,y>X,Y'"),
        ("1,2>3,4; 1,2>5,6", "share a handle"),
        ("1,nan>3,4", "finite"),
    ],
)
def test_bad_drag_text(text, message):
    with pytest.raises(InputError, match=message):
        parse_drag(text)


def test_handles_outside_the_image_or_the_mask():
    with pytest.raises(InputError, match="outside the 50x40 image"):
        drag_flow(*parse_drag("60,10>61,10"), 40, 50)
    mask = np.zeros((40, 50), bool)
    mask[:10, :10] = True
    with pytest.raises(InputError, match="outside the object mask"):
        drag_flow(*parse_drag("20,20>25,20"), 40, 50, mask)


def test_launch_target_from_drag_in_a_box():
    from mgjax import config as C
    from mgjax.edit.workflow import target

    config = C.make(out_dir="o", drag="12,15>20,11", object_box="5,10,30,25")
    flow, obj = target(config, None, 40, 50)
    assert obj.sum() == 25 * 15
    np.testing.assert_array_equal(flow[obj], np.broadcast_to([8.0, -4.0], flow[obj].shape))
    assert not flow[~obj].any()

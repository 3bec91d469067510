"""flow.unpickle: globals resolve only through the given whitelist (a hostile REDUCE never runs),
whitelisted globals are replaced by their stand-ins, BUILD and persistent ids go to the caller's
handlers or are refused, and a stream of pickles is read one at a time."""

import io
import os
import pickle
from pathlib import Path

import pytest

from flow.unpickle import Refused, load


class _Touch:
    """Pickles as a call that creates `target` when unpickled by an unrestricted unpickler."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.target}",))


class _Open:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:
        return (open, (str(self.target), "w"))


class _Stateful:
    def __init__(self) -> None:
        self.x = 1


_SYSTEM = (os.system.__module__, "system")


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_refuses_globals_outside_the_whitelist_without_running_them(tmp_path, protocol):
    target = tmp_path / "created"
    allowed = {("collections", "OrderedDict"): dict, ("builtins", "print"): print}
    for payload in (_Touch(target), _Open(target)):
        data = pickle.dumps({"ok": [1, 2.5, "x"], "evil": payload}, protocol=protocol)
        with pytest.raises(Refused, match=r"(posix|nt|io|builtins)\.(system|open)"):
            load(data, allowed)
        assert not target.exists()
    # The same name under another module is not the whitelisted global.
    with pytest.raises(Refused):
        load(pickle.dumps(_Touch(target), protocol=protocol), {("os", "system"): print})
    assert not target.exists()
    assert load(pickle.dumps({"ok": [1, 2.5, "x"]}, protocol=protocol), {}) == {"ok": [1, 2.5, "x"]}


def test_whitelisted_globals_are_replaced_by_their_stand_ins(tmp_path):
    target = tmp_path / "created"
    calls = []
    stand_in = lambda command: calls.append(command) or "stood in"  # noqa: E731
    assert load(pickle.dumps([_Touch(target)]), {_SYSTEM: stand_in}) == ["stood in"]
    assert calls == [f"touch {target}"] and not target.exists()


def test_build_and_persistent_ids_need_a_handler():
    allowed = {(__name__, "_Stateful"): _Stateful}
    data = pickle.dumps(_Stateful(), protocol=2)
    with pytest.raises(Refused, match="state set on a _Stateful"):
        load(data, allowed)
    seen = []
    obj = load(data, allowed, build=lambda target, state: seen.append((type(target), state)))
    assert isinstance(obj, _Stateful) and seen == [(_Stateful, {"x": 1})]

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return f"ref {obj[1:]}" if isinstance(obj, str) and obj.startswith("@") else None

    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(["@a", "b"])
    with pytest.raises(Refused, match="persistent id"):
        load(buf.getvalue(), {})
    assert load(buf.getvalue(), {}, persistent_load=lambda pid: pid.upper()) == ["REF A", "b"]


def test_reads_a_stream_of_pickles_one_at_a_time():
    buf = io.BytesIO(pickle.dumps(1) + pickle.dumps("two") + pickle.dumps([3]))
    assert [load(buf, {}), load(buf, {}), load(buf, {})] == [1, "two", [3]]
    with pytest.raises(EOFError):
        load(buf, {})

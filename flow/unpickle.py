"""A restricted unpickler: reads a pickle without importing or calling anything it names.

The caller gives a whitelist mapping each allowed global, `(module, name)`, to the object the
unpickler uses in its place (usually a stand-in that checks its arguments and builds plain
data). Any other global is refused before it is looked up, so a hostile pickle's REDUCE never
reaches `os.system` and the like. BUILD (setting an object's state) is refused unless the caller
handles it, and so are persistent ids. The pure-Python unpickler is used because the C one
cannot restrict BUILD.
"""

import io
import pickle
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, ClassVar


class Refused(pickle.UnpicklingError):
    """The pickle names a global outside the whitelist or does something its reader forbids.

    `str(error)` is what was refused, e.g. `posix.system`.
    """


def _load_build(self: "_Unpickler") -> None:
    """BUILD opcode: hands (object, state) to the caller's handler, or refuses."""
    state = self.stack.pop()
    target = self.stack[-1]
    if self._build is None:
        raise Refused(f"state set on a {type(target).__name__}")
    self._build(target, state)


class _Unpickler(pickle._Unpickler):
    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = _load_build

    def __init__(
        self,
        file: BinaryIO,
        allowed: Mapping[tuple[str, str], Any],
        build: Callable[[Any, Any], None] | None,
        persistent_load: Callable[[Any], Any] | None,
        encoding: str,
    ) -> None:
        super().__init__(file, encoding=encoding)
        self._allowed = allowed
        self._build = build
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except (KeyError, TypeError):
            raise Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise Refused(f"persistent id {str(pid)[:80]}")
        return self._persistent_load(pid)


def load(
    source: bytes | BinaryIO,
    allowed: Mapping[tuple[str, str], Any],
    *,
    build: Callable[[Any, Any], None] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
    encoding: str = "ASCII",
) -> Any:
    """Unpickles one object, resolving globals only through `allowed`.

    Args:
        source: the pickle's bytes, or a binary file positioned at a pickle (it is left just
            past the pickle, so a stream of pickles can be read one by one).
        allowed: `(module, name)` -> the object used for that global.
        build: called as `build(obj, state)` for each BUILD opcode; it applies the state or
            raises. Without it, BUILD is refused.
        persistent_load: resolves persistent ids; without it, they are refused.
        encoding: how strings pickled by Python 2 are decoded ("latin1" for numpy arrays).

    Raises:
        Refused: a global outside `allowed`, a BUILD or persistent id nobody handles.
        pickle.UnpicklingError, EOFError, ...: whatever a corrupt pickle makes the unpickler or
            a stand-in raise.
    """
    file = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    return _Unpickler(file, allowed, build, persistent_load, encoding).load()

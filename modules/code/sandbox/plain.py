"""Plain data from the program's process to the judge: JSON with one-key tags for the built-in types JSON lacks.

`encode` (run by the program's process, in pure Python so that it needs no import there) writes subclasses of the plain
types as their base type and refuses anything else; `decode` (run by the judge on untrusted bytes) rebuilds exact
built-in types only: None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset. No object of a
program's own classes can come out of it. Standard library only (see ``harness.py``).
"""

from _json import encode_basestring_ascii as _quote  # C; ASCII out, lone surrogates escaped (exact round trip)

_SMALL = 1 << 63  # larger ints travel as hex: no str-digits limit, linear time
_FLOATS = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}  # spellings json.loads accepts
_OPEN = {tuple: '{"t":[', set: '{"s":[', frozenset: '{"f":['}


def _write(value, out, depth):
    kind = type(value)
    if kind is str:
        out.append(_quote(value))
    elif value is None:
        out.append("null")
    elif kind is bool:
        out.append("true" if value else "false")
    elif kind is int:
        out.append(int.__repr__(value) if -_SMALL < value < _SMALL else f'{{"i":"{value:x}"}}')
    elif kind is float:
        text = float.__repr__(value)
        out.append(_FLOATS.get(text, text))
    elif depth > 100:
        raise TypeError("nested deeper than 100 levels")
    elif kind is list or kind is tuple or kind is set or kind is frozenset:
        out.append("[" if kind is list else _OPEN[kind])
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _write(item, out, depth + 1)
        out.append("]" if kind is list else "]}")
    elif kind is dict:
        out.append('{"m":[')
        for i, (key, item) in enumerate(value.items()):
            out.append(",[" if i else "[")
            _write(key, out, depth + 1)
            out.append(",")
            _write(item, out, depth + 1)
            out.append("]")
        out.append("]}")
    elif kind is bytes:
        out.append(f'{{"b":"{value.hex()}"}}')
    elif kind is complex:
        out.append('{"c":[')
        _write(value.real, out, depth)
        out.append(",")
        _write(value.imag, out, depth)
        out.append("]}")
    else:
        _write(_base_value(value), out, depth)


def _base_value(value):
    """A subclass instance as its exact base type, read through the base type's own slots (a str subclass with an
    always-true ``__eq__`` becomes the plain str it holds)."""
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):
        return dict(dict.items(value))
    for base in (list, tuple, set, frozenset):
        if isinstance(value, base):
            return base(base.__iter__(value))
    if hasattr(type(value), "__index__"):  # numpy integers and the like
        return int(type(value).__index__(value))
    raise TypeError(f"a {type(value).__name__} is not plain data")


def encode(value):
    """``value`` as ASCII JSON bytes; TypeError if it is not plain data (RecursionError if it contains itself)."""
    out = []
    _write(value, out, 0)
    return "".join(out).encode()


def _rebuild(obj):
    """json's object_hook: every JSON object is a one-key tag; rebuild it as an exact built-in."""
    if len(obj) != 1:
        raise ValueError("a JSON object that is not a tag")
    ((tag, body),) = obj.items()
    kind = type(body)
    if tag == "t" and kind is list:
        return tuple(body)
    if tag == "m" and kind is list:
        if not all(type(pair) is list and len(pair) == 2 for pair in body):
            raise ValueError("a dict tag that is not a list of pairs")
        return dict(body)
    if tag == "s" and kind is list:
        return set(body)
    if tag == "f" and kind is list:
        return frozenset(body)
    if tag == "i" and kind is str:
        return int(body, 16)
    if tag == "b" and kind is str:
        return bytes.fromhex(body)
    if tag == "c" and kind is list and len(body) == 2 and all(type(x) in (int, float) for x in body):
        return complex(body[0], body[1])
    raise ValueError(f"unknown tag {tag!r}")


def decode(data):
    """Inverse of `encode`, for bytes from an untrusted writer. Anything but a well-formed tree raises ValueError,
    TypeError (unhashable set members or dict keys), RecursionError or MemoryError; nothing else can come back."""
    import json  # the judge's: imported by the fork server, or by I after it forked the program's process

    return json.loads(data.decode("utf-8"), object_hook=_rebuild)

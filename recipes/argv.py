"""Command-line rewrites applied before the LightningCLI parser sees the arguments."""

from __future__ import annotations

import json

NULLS = ("null", "None", "~")


def nested_nulls(args: list[str]) -> list[str]:
    """``args`` with each ``--A.init_args.B.C null`` (or ``=null``) given as ``--A {"init_args": {"B": {"C": null}}}``.

    jsonargparse (4.53) hands a value nested two levels below a class's ``init_args`` to that class's own parser as
    the text ``--B.C=None``, which reads as the string "None": ``--model.init_args.model.config null`` was refused
    (a dict or null expected), so a tiny config could not be pointed at a pretrained folder without
    ``config={}``. The same value as a dict is merged into the parsed class as a real ``None``; other arguments keep
    their form, so a value of one level (``--trainer.logger.init_args.save_dir null``) is untouched."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        head, sep, path = key.partition(".init_args.")
        if key.startswith("--") and sep and "." in path and not key.endswith("+") and value in NULLS:
            nested: object = None
            for part in reversed(path.split(".")):
                nested = {part: nested}
            out.append(f"{head}={json.dumps({'init_args': nested})}")
            i += 1 if eq else 2
            continue
        out.append(arg)
        i += 1
    return out

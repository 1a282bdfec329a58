"""Run Markdown code blocks one after another in this interpreter, each on its own.

``python _run_blocks.py BLOCKS.json DIR``: ``BLOCKS.json`` lists ``[name, line, source]``.
Each block runs in fresh globals (``__name__ == "__main__"``, as a script) and in its own
empty directory under ``DIR``. A block fails if it raises (``SystemExit(0)`` excepted) or if
it leaves JAX's global configuration changed, since the next block would then run under
it. Writes ``DIR/results.json``: ``[name, line, error or ""]`` per block.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def _jax_config() -> dict:
    import jax  # imported once, before the first block: the point of sharing an interpreter

    # ``jax.config.values`` keeps the values flags were defined with; the holders keep the
    # values in force (``jax.config.update`` writes there).
    return {key: repr(holder.value) for key, holder in jax.config._value_holders.items()}


def main(spec: str, out: str) -> None:
    results = []
    for index, (name, line, source) in enumerate(json.loads(Path(spec).read_text())):
        workdir = Path(out) / f"block_{index}"
        workdir.mkdir()
        os.chdir(workdir)
        before = _jax_config()
        error = ""
        try:
            exec(compile(source, f"{name}:{line}", "exec"), {"__name__": "__main__"})
        except SystemExit as exit_:
            if exit_.code not in (None, 0):
                error = f"SystemExit({exit_.code!r})"
        except BaseException:  # every failure of a block is reported
            error = traceback.format_exc()[-3000:]
        after = _jax_config()
        changed = sorted(key for key in after if after[key] != before.get(key))
        if changed and not error:
            error = f"the block changes JAX's global configuration: {', '.join(changed)}"
        results.append([name, line, error])
    Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Writes notebooks/quickstart.ipynb from notebooks/quickstart.py (jupytext's percent format:
`# %%` starts a code cell, `# %% [markdown]` a Markdown cell of `# `-prefixed lines).

  python notebooks/make_ipynb.py
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cells(source: str) -> list[dict]:
    """The notebook cells of a percent-format script."""
    out, kind, lines = [], None, []
    for line in source.splitlines() + ["# %%"]:
        if line.startswith("# %%"):
            if kind is not None:
                while lines and not lines[-1].strip():
                    lines.pop()
                text = [l[2:] if l.startswith("# ") else l.lstrip("#") for l in lines] if kind == "markdown" else lines
                out.append({"cell_type": kind, "metadata": {}, "source": "\n".join(text),
                            **({"outputs": [], "execution_count": None} if kind == "code" else {})})
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    return out


def notebook(source: str) -> dict:
    return {"nbformat": 4, "nbformat_minor": 5, "cells": cells(source),
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                         "language_info": {"name": "python"}}}


def main() -> None:
    text = json.dumps(notebook((HERE / "quickstart.py").read_text()), indent=1) + "\n"
    (HERE / "quickstart.ipynb").write_text(text)
    print(f"Wrote {HERE / 'quickstart.ipynb'}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""The README's embedding example is code a user will paste: it must run as written."""
from __future__ import annotations

import os
import re

from conftest import ROOT


def test_the_embedding_api_example_runs() -> None:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Embedding API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    cwd = os.getcwd()
    os.chdir(ROOT)                          # the example names workloads/bin/... relative paths
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)

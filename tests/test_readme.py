"""README's Python example runs, on the tiny model: the documented API cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path


def test_readme_python_example_runs_on_the_tiny_model(tmp_path):
    readme = Path("README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert len(blocks) == 1, "README should hold exactly one Python example"
    code = blocks[0]
    # The same example on the smoke preset's tiny random model, writing into a temporary folder.
    for real, tiny in (('"configs/demo.yaml"', '"configs/smoke.yaml"'), ('"runs/api_example"', repr(str(tmp_path)))):
        assert real in code, real
        code = code.replace(real, tiny)
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert isinstance(namespace["after"], dict) and "trait" in namespace["after"]

"""The README's plain-Python example runs as written (fewer steps, export to a temporary folder)."""

import re

from transformers import AutoModelForCausalLM

from tests.conftest import REPO


def test_readme_python_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    assert "max_steps=100" in code and 'export_pretrained("my-model")' in code
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace("max_steps=100", "max_steps=3"), "README.md", "exec"), {})
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "my-model").config.model_type == "llama"

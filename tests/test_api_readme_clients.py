"""README's client lines run as written (only the server address differs): OpenAI SDK, the HF
`text_generation` client, and the raw TGI/LoRAX body that selects an adapter."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")  # inside text_generation

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_client_block_runs(api_server_url, api_client):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    block = next(b for b in blocks if "from text_generation import Client" in b)
    assert "adapter_id=" not in block.split("import requests")[0], "text_generation 0.7's generate has no adapter_id"
    lines: list[str] = []
    code = compile(block.replace("http://127.0.0.1:8000", api_server_url), "README.md", "exec")
    exec(code, {"print": lines.append})  # noqa: S102 - our own README
    assert len(lines) == 3 and all(isinstance(line, str) for line in lines)  # the first one samples: may be ""
    assert lines[1] and lines[2]
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 8}}
    base = requests.post(f"{api_server_url}/generate", json=body).json()["generated_text"]
    assert lines[1] == base and lines[2] != base  # the last line really ran on the adapter

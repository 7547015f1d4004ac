"""The compose file's vLLM parts against a real vLLM: server flags and the health-check endpoint.

The GPU image cannot run here, but vLLM's CPU build (``.venv-llm``, the same vLLM version as the
default ``vllm/vllm-openai`` tag) has the same OpenAI server and argument parser.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.llm_server import LLMServerInfo
from tests.unit.test_deploy import load_compose

pytestmark = [pytest.mark.integration, pytest.mark.llm]

ROOT = Path(__file__).resolve().parents[2]


def _vllm_python() -> Path:
    python = Path(os.environ.get("RAG_LLM_VENV", ROOT / ".venv-llm")) / "bin" / "python"
    if not python.exists():
        reason = f"no vLLM virtualenv ({python} missing; make .venv-llm/.installed)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set", pytrace=False)
        pytest.skip(reason)
    return python


@pytest.mark.slow
def test_vllm_service_flags_are_vllm_server_flags() -> None:
    vllm = load_compose()["services"]["vllm"]
    assert vllm["entrypoint"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    flags = [arg.split("=", 1)[0] for arg in vllm["command"]]
    proc = subprocess.run(
        [str(_vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    known = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", proc.stdout))
    missing = [f for f in flags if f not in known]
    assert not missing, f"vLLM's server does not know {missing}"


def test_health_endpoint_of_the_healthchecks(llm_server: LLMServerInfo) -> None:
    """The compose health checks of both model servers GET /health: vLLM answers it with 200."""
    with urllib.request.urlopen(f"{llm_server.base_url}/health", timeout=10) as response:
        assert response.status == 200

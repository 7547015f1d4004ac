"""Property-based run of the OpenAPI schema (schemathesis, in-process ASGI): no input makes a 5xx.

Runs on fakes (hash embedder, scripted LLM) with a seeded collection and auth off, so generated
requests reach deep into every route. Each operation gets a bounded number of examples to keep
the suite fast.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from starlette.testclient import TestClient

from app.main import create_app
from core.settings import Settings
from tests.unit.api_support import CORPUS, Api, default_responder
from tests.unit.fakes_llm import FakeLLM
from tests.unit.fakes_retrieval import HashEmbedder

pytestmark = [pytest.mark.integration]


async def _probe() -> None:
    return None


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    data = tmp_path_factory.mktemp("schemathesis")
    root = data / "allowed"
    (root / "folder").mkdir(parents=True)
    (root / "folder" / "a.md").write_text("# A\nalpha")
    settings = Settings(data_dir=data / "data", ingest={"allowed_roots": [str(root)]})
    # Seed with a first app instance (its lifespan ends; the database and index stay on disk).
    seeder = create_app(settings, embedder=HashEmbedder(), llm=FakeLLM(responder=default_responder), llm_probe=_probe)
    with TestClient(seeder) as client:
        Api(client=client, app=seeder, llm=FakeLLM(), settings=settings).seed("docs", CORPUS)
    app = create_app(settings, embedder=HashEmbedder(), llm=FakeLLM(responder=default_responder), llm_probe=_probe)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.slow
def test_no_input_causes_a_server_error(api_schema: Any) -> None:
    """Valid and invalid generated inputs for every operation; any 5xx fails with the reproducing case.

    (Schemathesis' ``from_fixture``/``parametrize`` pytest integration does not run on pytest 9, so
    the operations are driven through their Hypothesis strategies directly.)
    """
    failures: list[str] = []
    # A job's event stream lasts until its job ends, and no worker runs here (jobs uploads queue stay
    # queued): it is tested against a real worker in tests/integration/test_job_events.py.
    operations = [
        op for op in (result.ok() for result in api_schema.get_all_operations()) if not op.path.endswith("/events")
    ]
    assert len(operations) >= 15
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            @hypothesis.settings(
                max_examples=15,
                deadline=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                derandomize=True,
                database=None,
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            def check(case: Any) -> None:
                case.call_and_validate(checks=[not_a_server_error])

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                continue  # no invalid input exists (an operation without parameters)
            except Exception as e:  # collect every failing operation, then report them all
                failures.append(f"{operation.label} ({mode.value}): {e}")
    assert not failures, "\n\n".join(failures)

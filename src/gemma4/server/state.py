"""What the HTTP layer needs: the engine thread, tokenizer, names, defaults, metrics."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..engine.engine import LLMEngine
from .async_engine import AsyncEngine


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gemma4_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gemma4_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("gemma4_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("gemma4_num_requests_running", "Sequences running in the engine", registry=r)
        self.waiting = Gauge("gemma4_num_requests_waiting", "Sequences queued in the engine", registry=r)
        self.kv_usage = Gauge("gemma4_kv_cache_usage_ratio", "Share of KV blocks in use", registry=r)
        self.prefix_cache_hit_rate = Gauge("gemma4_prefix_cache_hit_rate",
                                           "Share of admitted prompt tokens whose KV came from the prefix cache",
                                           registry=r)
        self.prefix_cache_hit_tokens = Gauge("gemma4_prefix_cache_hit_tokens",
                                             "Admitted prompt tokens whose KV came from the prefix cache", registry=r)
        self.prefix_cache_query_tokens = Gauge("gemma4_prefix_cache_query_tokens", "Admitted prompt tokens",
                                               registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("gemma4_request_latency_seconds", "End-to-end request latency", buckets=buckets,
                                 registry=r)
        self.ttft = Histogram("gemma4_time_to_first_token_seconds", "Time to first token", buckets=buckets, registry=r)


@dataclass
class ServerState:
    engine: AsyncEngine
    tokenizer: object
    model_names: list[str]
    max_model_len: int
    sampling_defaults: dict = field(default_factory=dict)
    default_enable_thinking: bool = False
    api_key: str | None = None
    allowed_media_domains: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=lambda: ["*"])  # CORS origins (--allowed-origins), as vLLM
    has_vision: bool = False
    has_audio: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    metrics: Metrics = field(default_factory=Metrics)
    processor: object = None  # gemma4.Processor (image/audio inputs); built from the tokenizer when not given
    media_slots: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(2))

    def __post_init__(self):
        if self.processor is None and (self.has_vision or self.has_audio):
            from ..processing.processor import Processor
            self.processor = Processor(self.tokenizer)


def build_state(model, tokenizer, model_name: str, max_model_len: int | None = None, max_num_seqs: int = 16,
                max_num_batched_tokens: int = 512, num_blocks: int | None = None,
                gpu_memory_utilization: float = 0.9, kv_cache_dtype: str = "auto", enable_prefix_caching: bool = True,
                speculative_model=None, num_speculative_tokens: int | None = None, **kwargs) -> ServerState:
    """The engine sized from the memory there is (engine/memory.py; ValueError when one sequence of max_model_len
    does not fit, or kv_cache_dtype is neither "auto" nor "fp8") and warmed up, in its thread."""
    engine = LLMEngine(model, max_num_seqs=max_num_seqs, max_model_len=max_model_len, num_blocks=num_blocks,
                       max_num_batched_tokens=max_num_batched_tokens, stop_token_ids=tokenizer.stop_token_ids,
                       gpu_memory_utilization=gpu_memory_utilization, kv_cache_dtype=kv_cache_dtype,
                       enable_prefix_caching=enable_prefix_caching, tokenizer=tokenizer,
                       speculative_model=speculative_model, num_speculative_tokens=num_speculative_tokens)
    if model.device.type == "cuda":  # compile the kernels and capture the graphs before the server reports ready
        engine.warm_up()
    generation = getattr(model, "generation_config", {}) or {}
    defaults = {k: generation[k] for k in ("temperature", "top_p", "top_k") if k in generation}
    if generation.get("do_sample") is False:
        defaults["temperature"] = 0.0
    config = model.config
    return ServerState(AsyncEngine(engine), tokenizer, [model_name], engine.max_model_len, defaults,
                       has_vision=getattr(config, "vision_config", None) is not None,
                       has_audio=getattr(config, "audio_config", None) is not None, **kwargs)

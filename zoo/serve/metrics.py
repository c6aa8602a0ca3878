"""Prometheus metrics of the server (one registry per app, so several apps can live in a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0)
_TPOT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0)


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        self.running = Gauge("zoo_num_requests_running", "Requests holding a KV-cache slot (decoding)", registry=r)
        self.waiting = Gauge("zoo_num_requests_waiting", "Requests accepted but not yet in a KV-cache slot",
                             registry=r)
        self.peak_running = Gauge("zoo_num_requests_running_peak",
                                  "Most requests running at once after an engine step, since the server started",
                                  registry=r)
        self.kv_usage = Gauge("zoo_kv_cache_usage_ratio", "Share of the KV-cache blocks held by requests (0..1; "
                              "slots in use / slots under tensor parallelism)", registry=r)
        self.kv_slots = Gauge("zoo_kv_cache_slots", "KV-cache slots (the largest decode batch)", registry=r)
        self.kv_blocks = Gauge("zoo_kv_cache_blocks", "KV-cache blocks in the pool (0: not known here)", registry=r)
        self.prefix_hit_tokens = Gauge("zoo_prefix_cache_hit_tokens", "Prompt tokens whose KV came from cached "
                                       "prefix blocks, since the server started", registry=r)
        self.preemptions = Gauge("zoo_num_preemptions", "Requests preempted (blocks taken back, re-prefilled later) "
                                 "since the server started", registry=r)
        self.prompt_tokens = Counter("zoo_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = Counter("zoo_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("zoo_requests", "Requests finished, by finish reason (stop, length, aborted, error)",
                                ["finish_reason"], registry=r)
        self.http_errors = Counter("zoo_http_errors", "Requests refused with an error response, by status code",
                                   ["status"], registry=r)
        self.ttft = Histogram("zoo_time_to_first_token_seconds", "Time from arrival to the first new token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("zoo_e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("zoo_time_per_output_token_seconds", "Mean time per output token after the first",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.steps = Counter("zoo_engine_steps", "Engine steps (admit + one decode for every running request)",
                             registry=r)
        self.step_errors = Counter("zoo_engine_step_errors", "Engine steps that raised (their requests failed)",
                                   registry=r)
        self.step_seconds = Histogram("zoo_engine_step_seconds", "Duration of one engine step",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.step_batch_size = Histogram("zoo_engine_step_batch_size",
                                         "Requests that got a new token in one engine step (continuous batching)",
                                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256),
                                         registry=r)
        self.graphs_ready = Gauge("zoo_graphs_ready", "Compiled graphs built so far (buckets not built yet run "
                                  "eagerly while --compiled compiles in the background)", registry=r)
        self.graphs_total = Gauge("zoo_graphs_total", "Graphs of every shape bucket (0: eager, no graphs)",
                                  registry=r)
        info = Gauge("zoo_model_info", "The served model (value is always 1)", ["model"], registry=r)
        info.labels(model=model_name).set(1)

    def bind(self, engine_loop) -> None:
        """Gauges read the engine's state at scrape time (len() of its containers, no lock needed)."""
        slots = engine_loop.engine.cache.num_slots
        self.kv_slots.set(slots)
        self.running.set_function(engine_loop.running)
        self.waiting.set_function(engine_loop.queued)
        self.peak_running.set_function(lambda: engine_loop.peak_running)
        cache = engine_loop.engine.cache
        pool = getattr(cache, "pool", None)  # a local engine's paged cache (the TP stand-in knows slots only)
        if pool is None:
            self.kv_usage.set_function(lambda: engine_loop.running() / slots)
        else:
            blocks = cache.num_blocks
            self.kv_blocks.set(blocks)
            self.kv_usage.set_function(lambda: (blocks - cache.free_blocks) / blocks)
            self.prefix_hit_tokens.set_function(lambda: pool.hit_tokens)
            self.preemptions.set_function(lambda: getattr(engine_loop.engine, "preemptions", 0))
        runner = getattr(engine_loop.engine, "runner", None)  # a local engine's (not the TP / PD stand-ins)
        if runner is not None and runner.compiled:
            self.graphs_ready.set_function(lambda: runner.graphs_ready)
            self.graphs_total.set(runner.graphs_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The ``teacher`` section of params.yaml (and ``judge``, which inherits every key it does not
set from it): the backend, its endpoint, retries, budget, prices and cache."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meteor.params import Section


class TeacherParams(Section):
    backend: Literal["offline", "openai", "local"] = Field("offline", description="Who answers.")
    model: str = Field("offline-reference", description="Model name (openai) or path/hub id (local).")
    base_url: str | None = Field(None, description="OpenAI-compatible endpoint; else $OPENAI_BASE_URL.")
    max_concurrency: int = Field(16, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(5, ge=0, description="Retries on 429/5xx/timeouts (exponential backoff).")
    json_retries: int = Field(2, ge=0, description="Re-asks when a JSON answer fails validation.")
    json_mode: bool = Field(
        True, description="Send response_format=json_object for verdict/score calls (OpenAI, vLLM, "
                          "Ollama); transformers serve ignores it. Off for servers that reject it.")
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(1024, ge=1)
    budget_usd: float | None = Field(None, gt=0, description="Stop cleanly before spending more.")
    prices: dict[str, dict[str, float]] = Field(
        default_factory=lambda: {
            "gpt-4o-mini": {"input": 0.15, "output": 0.60},
            "gpt-4o": {"input": 2.50, "output": 10.0},
        },
        description="USD per 1M tokens, by model name; unknown models cost 0.",
    )
    cache_dir: str | None = Field(
        None, description="Persistent response cache directory; null: <cache root>/teacher, the "
                          "root being $METEOR_CACHE_DIR, else $XDG_CACHE_HOME/meteor (~/.cache/meteor). "
                          "Outside the repo, so queued and temp experiments share it.")
    batch_size: int = Field(8, ge=1, description="Batch size of the local backend.")

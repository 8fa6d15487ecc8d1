"""The generation engine: paged KV cache, prefix caching, continuous batching, sampling."""
from srlm_engine.engine.llm import LLM
from srlm_engine.engine.outputs import CompletionOutput, Logprob, RequestOutput
from srlm_engine.engine.sampler import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob"]

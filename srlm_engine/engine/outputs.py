"""What generate and chat return: vLLM's RequestOutput, CompletionOutput and Logprob, with
their field names and meanings, so that code reading vLLM's outputs reads these unchanged."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Logprob:
    """One token's raw log-prob (the model's distribution, before temperature and filtering), its
    1-based rank in that distribution, and its text."""
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """One sample of a request. logprobs (when SamplingParams.logprobs = k): per generated token,
    {token id: Logprob} for the top-k and the sampled token. finish_reason: "stop" or "length";
    stop_reason: the stop string or stop token id that ended it, None for EOS or length."""
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One request: its prompt (the text given, or rendered by chat; None for token ids), its
    tokens, and its n samples. request_id is its index in the call, as a string."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True

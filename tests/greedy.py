"""Greedy decoding with a plain loop and no KV cache: the dense forward reruns the whole sequence
each step. Slow by design; it is the obviously-right reference the engine is tested against.

Imported as `greedy` from any test folder: tests/ is on sys.path through tests/conftest.py."""
from __future__ import annotations

import torch

from srlm_engine.model.llama import Llama


@torch.no_grad()
def greedy_generate(model: Llama, prompt_ids: list[int], max_new_tokens: int,
                    eos_token_ids: list[int] = ()) -> list[int]:
    """Token ids generated after `prompt_ids`, stopping after an eos token or `max_new_tokens`."""
    device = model.embed_tokens.weight.device
    ids = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(ids)[0, -1].argmax())
        out.append(nxt)
        if nxt in eos_token_ids:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out

"""Records -> tokens with exact assistant masks, the truncation rule, and batches that do not
depend on the number of processes."""
import pytest
import torch

from srlm_engine.io import DataError
from srlm_engine.model.pull import pull
from srlm_engine.tokenizer import Tokenizer
from srlm_engine.train import batches
from srlm_engine.train.batches import IGNORE


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(pull())


def conv(*turns):
    return [{"role": r, "content": c} for r, c in turns]


def trained_text(tok, ids, mask):
    """Decode each maximal run of trained tokens."""
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_sft_mask_is_exactly_the_assistant_turns(tok):
    msgs = conv(("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!\nHow can I help?"),
                ("user", "Name a colour."), ("assistant", "Blue."))
    enc = batches.encode_sft(tok, [{"messages": msgs}], max_seq_len=512)
    ids, mask = enc.ids[0], enc.mask[0]
    # The whole rendering, token for token, and only the replies (with their <|im_end|>) trained.
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(msgs, add_generation_prompt=False)
    assert trained_text(tok, ids, mask) == ["Hello!\nHow can I help?<|im_end|>", "Blue.<|im_end|>"]
    # The prompt before the last reply is tokenized exactly as generation tokenizes it.
    prompt = tok.encode(tok.apply_chat_template(msgs[:4], add_generation_prompt=True), add_special_tokens=False)
    assert ids[:len(prompt)] == prompt and mask[len(prompt)] and not mask[len(prompt) - 1]
    assert enc.truncated == 0


def test_pair_encoding_prompt_plus_response_plus_eos(tok):
    rec = {"prompt": "2+2?", "chosen": "4", "rejected": "5, I think", "extra": 1}
    enc = batches.encode_pairs(tok, [rec], max_seq_len=512)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "2+2?"}]), add_special_tokens=False)
    eos = tok.token_to_id("<|im_end|>")
    assert enc.ids[0] == prompt + tok.encode("4", add_special_tokens=False) + [eos]
    assert enc.rejected_ids[0][:len(prompt)] == prompt and enc.rejected_ids[0][-1] == eos
    assert enc.mask[0] == [False] * len(prompt) + [True] * (len(enc.ids[0]) - len(prompt))


def test_pair_responses_end_with_the_templates_end_of_turn_as_sft_trains_it(tok):
    # A Llama-3-like template: turns end with a token that is not the tokenizer's eos_token.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|endoftext|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t = Tokenizer(tok.tok, tok.config, template)
    assert t.eos_token == "<|im_end|>"
    rec = {"prompt": "2+2?", "chosen": "4", "rejected": "5, I think"}
    enc = batches.encode_pairs(t, [rec], max_seq_len=512)
    assert trained_text(t, enc.ids[0], enc.mask[0]) == ["4<|endoftext|>"]
    assert trained_text(t, enc.rejected_ids[0], enc.rejected_mask[0]) == ["5, I think<|endoftext|>"]
    sft = batches.encode_sft(t, [{"messages": conv(("user", "2+2?"), ("assistant", "4"))}], max_seq_len=512)
    n = len(enc.ids[0])
    assert sft.ids[0][:n] == enc.ids[0] and sft.mask[0][:n] == enc.mask[0] and not any(sft.mask[0][n:])


def test_trls_sft_forms_train_the_completion_only(tok):
    # {"prompt": str, "completion": str} is the conversation [user, assistant], token for token.
    strings = batches.encode_sft(tok, [{"prompt": "2+2?", "completion": "4"}], max_seq_len=512)
    plain = batches.encode_sft(tok, [{"messages": conv(("user", "2+2?"), ("assistant", "4"))}], max_seq_len=512)
    assert (strings.ids, strings.mask) == (plain.ids, plain.mask)
    # Conversational: the whole conversation rendered, the prompt's own assistant turn not trained.
    prompt = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Name a colour."))
    rec = {"prompt": prompt, "completion": conv(("assistant", "Blue."))}
    enc = batches.encode_sft(tok, [rec], max_seq_len=512)
    whole = prompt + rec["completion"]
    rendered = tok.apply_chat_template(whole, add_generation_prompt=False)
    assert tok.decode(enc.ids[0], skip_special_tokens=False) == rendered
    assert trained_text(tok, enc.ids[0], enc.mask[0]) == ["Blue.<|im_end|>"]
    both = batches.encode_sft(tok, [{"messages": whole}], max_seq_len=512)  # the messages form trains both replies
    assert both.ids == enc.ids
    assert trained_text(tok, both.ids[0], both.mask[0]) == ["Hello!<|im_end|>", "Blue.<|im_end|>"]


def test_trls_pair_forms_render_through_the_chat_template(tok):
    string = {"prompt": "2+2?", "chosen": "4", "rejected": "5, I think"}
    a, b = conv(("assistant", "4")), conv(("assistant", "5, I think"))
    conversational = {"prompt": conv(("user", "2+2?")), "chosen": a, "rejected": b}
    implicit = {"chosen": conv(("user", "2+2?")) + a, "rejected": conv(("user", "2+2?")) + b}
    encs = [batches.encode_pairs(tok, [r], max_seq_len=512) for r in (string, conversational, implicit)]
    for e in encs[1:]:
        assert (e.ids, e.mask, e.rejected_ids, e.rejected_mask) == \
            (encs[0].ids, encs[0].mask, encs[0].rejected_ids, encs[0].rejected_mask)
    # A multi-turn prompt with a system turn: rendered as generation sees it, only the reply trained.
    prompt = conv(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "2+2?"))
    enc = batches.encode_pairs(tok, [{"prompt": prompt, "chosen": a, "rejected": b}], max_seq_len=512)
    p = tok.encode(tok.apply_chat_template(prompt, add_generation_prompt=True), add_special_tokens=False)
    assert enc.ids[0][:len(p)] == p and enc.rejected_ids[0][:len(p)] == p
    assert trained_text(tok, enc.ids[0], enc.mask[0]) == ["4<|im_end|>"]
    assert trained_text(tok, enc.rejected_ids[0], enc.rejected_mask[0]) == ["5, I think<|im_end|>"]


def test_truncation_keeps_prompt_tail_and_response_head(tok):
    long_prompt = " ".join(f"w{i}" for i in range(200))
    rec = {"prompt": long_prompt, "chosen": "short answer", "rejected": " ".join(["no"] * 100)}
    full = batches.encode_pairs(tok, [rec], max_seq_len=10_000)
    enc = batches.encode_pairs(tok, [rec], max_seq_len=64)
    assert enc.truncated == 1
    assert len(enc.ids[0]) <= 64 and len(enc.rejected_ids[0]) == 64
    # The rejected response (the longer) keeps its head, at least L // 2 = 32 tokens ...
    n_rej = sum(enc.rejected_mask[0])
    assert n_rej >= 32 and enc.rejected_ids[0][-n_rej:] == full.rejected_ids[0][-sum(full.rejected_mask[0]):][:n_rej]
    # ... the prompt keeps its tail (ending in the generation prompt), the same for both.
    p = 64 - n_rej
    assert enc.ids[0][:p] == enc.rejected_ids[0][:p]
    full_prompt = full.ids[0][:len(full.ids[0]) - sum(full.mask[0])]
    assert enc.ids[0][:p] == full_prompt[-p:]
    # The chosen response fits whole.
    assert enc.ids[0][p:] == full.ids[0][len(full_prompt):]


def test_sft_truncation_counted(tok):
    recs = [{"messages": conv(("user", "x " * 300), ("assistant", "y " * 300))},
            {"messages": conv(("user", "a"), ("assistant", "b"))}]
    enc = batches.encode_sft(tok, recs, max_seq_len=100)
    assert enc.truncated == 1 and len(enc.ids[0]) == 100 and sum(enc.mask[0]) >= 50
    assert len(enc.ids[1]) < 100


def test_bad_pair_and_sft_records_are_errors(tok):
    with pytest.raises(DataError, match="pair record 1: chosen and rejected are the same"):
        batches.encode_pairs(tok, [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                   {"prompt": "p", "chosen": "a", "rejected": "a"}], 64)
    with pytest.raises(DataError, match="pair record 0: missing field 'rejected'"):
        batches.encode_pairs(tok, [{"prompt": "p", "chosen": "a"}], 64)
    with pytest.raises(DataError, match="SFT record 0: messages hold no assistant turn"):
        batches.encode_sft(tok, [{"messages": conv(("user", "only a question"))}], 64)
    with pytest.raises(DataError, match=r"pair record 0: chosen\[0\]\.role must be 'assistant'"):
        batches.encode_pairs(tok, [{"prompt": conv(("user", "q")), "chosen": conv(("user", "a")),
                                    "rejected": conv(("assistant", "b"))}], 64)
    with pytest.raises(DataError, match="SFT record 0: missing field 'completion'"):
        batches.encode_sft(tok, [{"prompt": "q"}], 64)


def test_pad_targets_are_next_trained_tokens():
    ids, tgt = batches.pad([[5, 6, 7, 8], [9, 10]], [[False, False, True, True], [False, True]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert tgt.tolist() == [[IGNORE, 7, 8, IGNORE], [10, IGNORE, IGNORE, IGNORE]]


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_micro_batches_same_global_batch_for_any_world(world, accum):
    enc = batches.Encoded(ids=[[1] * (i % 7 + 1) for i in range(13)], mask=[[True]] * 13)
    for step in range(5):  # 5 * 8 samples cycle through 13 records over several epochs
        ranks = [batches.micro_batches(enc, step, 8, world, r, accum, seed=3) for r in range(world)]
        single = batches.micro_batches(enc, step, 8, 1, 0, world * accum, seed=3)
        # micro-batch k of the single process is rank k % W's micro-batch k // W.
        assert [ranks[k % world][k // world] for k in range(world * accum)] == single
    # Every record is seen once per epoch.
    seen = batches.sample_order(13, 0, 26, seed=3)
    assert sorted(seen[:13]) == list(range(13)) and sorted(seen[13:]) == list(range(13))


def test_pack_holds_the_shared_prefix_once_and_every_token_in_its_own_context(tok):
    same = "What is the capital of France? Answer in one sentence, please."
    recs = [{"messages": conv(("user", same), ("assistant", a))}
            for a in ("Paris.", "Paris is the capital of France.", "It is Paris, on the Seine.")]
    recs.append({"messages": conv(("user", same + " Be brief."), ("assistant", "Paris."))})
    enc = batches.encode_sft(tok, recs, 128)
    idx = [0, 1, 2, 3]
    ids, tgt = batches.collate(enc, idx, 0, False)
    lens = batches.row_lengths(enc, idx, False)
    p = batches.pack(ids, tgt, lens)
    shared = int((p.segments == 0).sum())
    assert shared > 20 and p.ids.shape[1] == shared + sum(x - shared for x in lens) < ids.numel()
    assert (tgt[:, :shared] == IGNORE).all()  # no token a loss reads lies in the shared prefix
    for r, x in enumerate(lens):
        at = p.rows[r, :x]
        assert torch.equal(p.ids[0, at], ids[r, :x]) and torch.equal(p.positions[0, at], torch.arange(x))
        assert torch.equal(p.targets[0, at], tgt[r, :x])
        assert p.segments[at].tolist() == [0] * shared + [r + 1] * (x - shared) and (p.rows[r, x:] == -1).all()
    # the first three differ only from the reply on: the prefix stops one token before the first
    # trained one, the last position whose target (that token) a loss reads
    first = enc.mask[0].index(True)
    p3 = batches.pack(ids[:3], tgt[:3], lens[:3])
    assert int((p3.segments == 0).sum()) == first - 1 and enc.ids[0][:first] == enc.ids[1][:first]
    assert batches.pack(ids[:1], tgt[:1], lens[:1]) is None  # one sequence: nothing to share
    assert batches.pack(ids[:2], tgt[:2], lens[:2], min_saving=0.99) is None  # saves too little

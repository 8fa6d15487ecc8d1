"""Settings as dataclasses, checked in __post_init__.

TrainConfig and LoopConfig fields carry what the command line says of them (`setting`: help
text, allowed values, the stage a training setting belongs to); flags.py makes the flags from
them. Their TOML files are read by `read_toml` (a path, or a config shipped in
srlm_engine/configs/) and written by `to_toml` (`--print-config`).

ModelConfig mirrors the fields of a Hugging Face Llama config.json that change the computation;
`from_hf` validates a config.json dict and names the file and field that is wrong.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the source and the field."""


_KINDS = {  # annotation -> (test, what the error says is wanted)
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "None": (lambda v: v is None, "unset"),
    "tuple[float, float]": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                            and all(_KINDS["float"][0](x) for x in v), "a pair of numbers"),
    "TrainConfig": (lambda v: isinstance(v, TrainConfig), "a table of training settings"),
    "RopeScaling": (lambda v: isinstance(v, RopeScaling), "a rope_scaling object"),
    "list[int]": (lambda v: isinstance(v, list) and all(_KINDS["int"][0](x) for x in v), "a list of integers"),
    "dict[str, Any]": (lambda v: isinstance(v, dict), "an object"),
}


_NUMBER_OR_NONE = ("int | None", "float | None")


def _none_words(obj) -> None:
    """"none" in a setting that is a number or unset means unset, in a TOML file as in a flag
    (TOML has no null); in a path setting it would be a file name."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        if f.type in _NUMBER_OR_NONE and isinstance(v, str) and v.lower() == "none":
            setattr(obj, f.name, None)


def _check_types(obj) -> None:
    """Every field of a settings dataclass against its annotation (a string here, e.g.
    "int | None"): a TOML string "false" in a bool field, 2.5 in an int one or "0.7" in a float
    one is a ConfigError naming the field, never truthy or a TypeError later. A bool is not
    an int here, though Python says it is; an int is a float."""
    for f in fields(obj):
        v = getattr(obj, f.name)
        kinds = [_KINDS[k] for k in f.type.split(" | ")]
        if not any(ok(v) for ok, _ in kinds):
            raise ConfigError(f"{f.name} must be {' or '.join(want for _, want in kinds)}, got {v!r}")


@dataclass
class RopeScaling:
    """The `llama3` rope_scaling block (Llama 3.1+): low frequencies are divided by `factor`,
    high ones kept, the band between interpolated smoothly."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    head_dim: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "max_position_embeddings")

    def __post_init__(self):
        _check_types(self)  # a config.json "false" in tie_word_embeddings is an error, not truthy
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
        rs = self.rope_scaling
        if rs is not None and not (math.isfinite(rs.factor) and rs.factor > 0 and rs.low_freq_factor > 0
                                   and math.isfinite(rs.high_freq_factor) and rs.high_freq_factor > rs.low_freq_factor
                                   and rs.original_max_position_embeddings > 0):
            raise ConfigError(f"rope_scaling needs factor > 0, 0 < low_freq_factor < high_freq_factor and "
                              f"original_max_position_embeddings > 0, got {asdict(rs)}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        arch = d.get("model_type")
        if arch is not None and arch != "llama":
            raise ConfigError(f"{source}: model_type is {arch!r}; only 'llama' is supported")
        for name in cls.REQUIRED:
            if name not in d:
                raise ConfigError(f"{source}: missing field {name!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = d["num_attention_heads"]
        kw.setdefault("rms_norm_eps", 1e-6)  # transformers' LlamaConfig default, where the file has none
        if d.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only 'silu')")
        # transformers >= 5 writes rope settings as one `rope_parameters` block; older files as
        # top-level rope_theta + rope_scaling. Read both.
        rs = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        if rp is not None and not isinstance(rp, dict):
            raise ConfigError(f"{source}: rope_parameters must be an object or null, got {rp!r}")
        if isinstance(rp, dict):
            if "rope_theta" in rp:
                kw["rope_theta"] = rp["rope_theta"]
            rs = rp
        if rs is not None:
            if not isinstance(rs, dict):
                raise ConfigError(f"{source}: rope_scaling must be an object or null, got {rs!r}")
            kind = rs.get("rope_type", rs.get("type"))
            if kind is None and set(rs) - {"rope_theta"}:
                raise ConfigError(f"{source}: rope_scaling has settings but no rope_type, got {rs!r}")
            if kind in ("default", None):
                kw["rope_scaling"] = None
            elif kind != "llama3":
                raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
            else:
                try:
                    kw["rope_scaling"] = RopeScaling(
                        factor=float(rs["factor"]), low_freq_factor=float(rs["low_freq_factor"]),
                        high_freq_factor=float(rs["high_freq_factor"]),
                        original_max_position_embeddings=int(rs["original_max_position_embeddings"]))
                except KeyError as e:
                    raise ConfigError(f"{source}: rope_scaling is missing field {e}") from None
                except (TypeError, ValueError):
                    raise ConfigError(f"{source}: rope_scaling's factor, low_freq_factor, high_freq_factor and "
                                      f"original_max_position_embeddings must be numbers, got {rs!r}") from None
        kw["extra"] = {k: v for k, v in d.items() if k not in known}
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        d = {**self.extra, **d}
        if self.rope_scaling is not None:
            d["rope_scaling"] = asdict(self.rope_scaling)
        d["architectures"] = ["LlamaForCausalLM"]
        d["model_type"] = "llama"
        return d


CHECKPOINTING = ("none", "selective", "full")  # activation checkpointing modes (train/parallel.py)
MIXED_PRECISION = ("auto", "bf16", "none")  # TrainConfig.mixed_precision
REPORT_TO = ("none", "tensorboard")  # TrainConfig.report_to
GENERATION_DTYPES = ("auto", "float32", "bfloat16", "float16")  # device.DTYPES, without importing torch here
EFT_TARGETS = ("judgment", "score")  # what an EFT example teaches the judge to write (data.eft_to_sft)


def setting(default, help: str, choices: tuple | None = None, only: str | None = None):
    """A settings field and what the command line says of it: its help, the values it takes
    (checked in __post_init__, listed by --help), and for a training setting that one stage alone
    reads, that stage (`only="dpo"`: no `srlm sft` flag). A class as default is a default_factory."""
    meta = {"help": help, "choices": choices, "only": only}
    if isinstance(default, type):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def _check_choices(obj) -> None:
    for f in fields(obj):
        choices, v = f.metadata.get("choices"), getattr(obj, f.name)
        if choices and v not in choices:
            raise ConfigError(f"{f.name} must be {one_of(choices)}, got {v!r}")


def one_of(choices) -> str:
    """('a', 'b', 'c') -> "'a', 'b' or 'c'"."""
    quoted = [repr(c) for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


@dataclass
class TrainConfig:
    """Settings of one SFT or DPO run (train/trainer.py). The global batch is
    processes x micro_batch_size x grad_accum sequences (SFT) or pairs (DPO), as in TRL. Give
    `global_batch_size` instead of grad_accum to keep it the same however many processes train:
    grad_accum is then global_batch_size / (processes x micro_batch_size), which must be whole.
    With neither set, grad_accum is 4.

    lr / min_lr default to the paper's (SFT 5.5e-6 -> 1.1e-6, DPO 1e-6 -> 1e-7) when left None;
    they are given for a global batch of `lr_batch_size` (the paper's 16) and scaled by
    `lr_scaling` ('none', 'linear', 'sqrt') when the run's global batch differs.
    """
    max_seq_len: int = setting(1024, "tokens per sequence; a longer record keeps the head of its reply and the "
                                     "tail of its prompt")
    micro_batch_size: int = setting(4, "sequences (pairs for DPO) per forward pass in each process")
    grad_accum: int | None = setting(None, "micro-batches per process per optimizer step ('none': from "
                                           "global_batch_size, or 4 with neither set)")
    global_batch_size: int | None = setting(None, "sequences (pairs) per optimizer step over all processes, "
                                                  "instead of grad_accum")
    epochs: float = setting(1.0, "passes over the data (fractions allowed)")
    max_steps: int | None = setting(None, "optimizer steps; overrides epochs when set")
    lr: float | None = setting(None, "peak learning rate ('none': the paper's, SFT 5.5e-6, DPO 1e-6)")
    min_lr: float | None = setting(None, "learning rate at the end of the decay ('none': lr / 10, or the "
                                         "paper's SFT 1.1e-6, DPO 1e-7 where lr is unset too)")
    lr_batch_size: int = setting(16, "the global batch that lr is given for")
    lr_scaling: str = setting("none", "how lr follows a global batch other than lr_batch_size",
                              ("none", "linear", "sqrt"))
    warmup_steps: int = setting(0, "steps of linear warmup from 0 to lr")
    schedule: str = setting("linear", "decay after warmup, down to min_lr", ("linear", "cosine"))
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas (two numbers)")
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    max_grad_norm: float | None = setting(1.0, "gradient clipping norm ('none': no clipping)")
    beta: float = setting(0.1, "DPO beta: strength of the pull towards the reference model", only="dpo")
    loss_type: str = setting("sigmoid", "DPO loss", ("sigmoid", "ipo", "hinge", "robust"), only="dpo")
    label_smoothing: float = setting(0.0, "DPO label smoothing: the assumed share of flipped preferences, in "
                                          "[0, 0.5) (sigmoid, robust; 0 for hinge and ipo)", only="dpo")
    seed: int = setting(0, "seed of the data order")
    save_every: int = setting(200, "steps between checkpoints, which a rerun resumes from")
    keep_last: int = setting(2, "checkpoints kept in OUT/checkpoints")
    keep_models: bool = setting(False, "keep the weights of removed checkpoints in OUT/models")
    dtype: str = setting("float32", "dtype the weights are held and saved in", ("float32", "bfloat16"))
    # bf16 compute over the fp32 weights. FSDP2 (2+ processes) casts the gathered parameters and
    # reduces gradients in fp32; one process runs the forward under torch.autocast.
    mixed_precision: str = setting("auto", "bf16 compute over fp32 weights (auto: where the device computes "
                                           "bf16 natively); ignored for bf16 weights", MIXED_PRECISION)
    share_prefix: bool = setting(False, "pack each micro-batch into one row with no padding, holding the prompt "
                                        "prefix its sequences share once (a mask keeps each sequence to the prefix "
                                        "and itself), where that saves a quarter of its tokens")
    trainable_layers: int | None = setting(None, "train only the top N transformer blocks and the final norm; "
                                                 "the embeddings and the blocks below stay frozen, and backward "
                                                 "stops above them ('none': every weight)")
    cache_frozen: bool = setting(False, "with trainable_layers: keep each sample's input to the lowest trained "
                                        "block after its first pass and start later epochs there, so the frozen "
                                        "blocks run once per sample (memory: tokens x hidden floats per sample; "
                                        "one process)")
    activation_checkpointing: str = setting("none", "recompute activations in the backward pass: whole "
                                                    "blocks (full), or all but matmul and attention outputs "
                                                    "(selective)",
                                            CHECKPOINTING)
    ref_batch_size: int = setting(8, "pairs per forward pass of the reference log-probs, computed once "
                                     "before training", only="dpo")
    progress: bool = setting(True, "show a progress bar")
    report_to: str = setting("none", "where the per-step metrics go besides OUT/metrics.jsonl: 'tensorboard' "
                                     "writes them to OUT/tb/ (needs the tensorboard package)", REPORT_TO)

    def __post_init__(self):
        if isinstance(self.activation_checkpointing, bool):  # a TOML `true` / `false`: whole blocks or none
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"
        if isinstance(self.mixed_precision, bool):  # a TOML `true` / `false`
            self.mixed_precision = "bf16" if self.mixed_precision else "none"
        _none_words(self)
        _check_types(self)
        _check_choices(self)
        for name in ("max_seq_len", "micro_batch_size", "grad_accum", "global_batch_size", "lr_batch_size",
                     "save_every", "keep_last", "ref_batch_size", "trainable_layers"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.grad_accum is not None and self.global_batch_size is not None:
            raise ConfigError(f"set grad_accum ({self.grad_accum}) or global_batch_size ({self.global_batch_size}), "
                              f"not both: one decides the other")
        if self.cache_frozen and self.trainable_layers is None:
            raise ConfigError("cache_frozen keeps the output of frozen blocks: set trainable_layers too")
        if self.max_seq_len < 4:
            raise ConfigError(f"max_seq_len must be at least 4, got {self.max_seq_len}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be a positive integer or None, got {self.max_steps!r}")
        if not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs!r}")
        for name in ("lr", "min_lr"):
            v = getattr(self, name)
            if v is not None and not v >= 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
        if self.lr is not None and self.min_lr is not None and self.min_lr > self.lr:
            raise ConfigError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas must each be in [0, 1), got {tuple(self.adam_betas)!r}")
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps must be > 0, got {self.adam_eps!r}")
        # The DPO loss's own rule (srlm_kernels.dpo_loss), checked here so a bad value fails when
        # the config is read, not at the first training step.
        if self.loss_type in ("sigmoid", "robust") and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5) for loss_type {self.loss_type!r}, "
                              f"got {self.label_smoothing!r}")
        if self.loss_type in ("hinge", "ipo") and self.label_smoothing != 0:
            raise ConfigError(f"label_smoothing must be 0 for loss_type {self.loss_type!r} (it has no "
                              f"meaning there), got {self.label_smoothing!r}")
        self.adam_betas = tuple(self.adam_betas)

    def accum_steps(self, processes: int) -> int:
        """Micro-batches each of `processes` runs per optimizer step."""
        if self.global_batch_size is None:
            return 4 if self.grad_accum is None else self.grad_accum
        per_step = processes * self.micro_batch_size
        if self.global_batch_size % per_step:
            raise ConfigError(f"global_batch_size {self.global_batch_size} is not a multiple of processes x "
                              f"micro_batch_size = {processes} x {self.micro_batch_size}")
        return self.global_batch_size // per_step

    @staticmethod
    def layer(lower: dict, upper: dict) -> dict:
        """Settings `upper` over `lower`, key by key; the batch is set one way or the other, so an
        upper grad_accum drops a lower global_batch_size and the other way round."""
        lower = dict(lower)
        for a, b in (("grad_accum", "global_batch_size"), ("global_batch_size", "grad_accum")):
            if a in upper:
                lower.pop(b, None)
        return {**lower, **upper}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "TrainConfig":
        """Build from a TOML table (or any dict); unknown keys are errors that name the source."""
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown training setting(s) {', '.join(unknown)}")
        try:
            return cls(**d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from None


# The seed data (IFT, EFT train and eval sets) is package data, srlm_engine/seed/: found the same way
# from a source checkout, an editable install and an installed wheel. pip installs packages as
# files, never zipped, so the Traversable is a directory on disk that the loop can read by path.
SEED_DIR = Path(resources.files("srlm_engine") / "seed")


@dataclass
class LoopConfig:
    """The self-rewarding loop (loop.py). Defaults are the paper's where it gives one
    (N=4 at temperature 0.7 / top_p 0.9; K=3 judgments; prompts at 0.6 / 0.9; 8 shots)."""
    iterations: int = setting(2, "self-rewarding iterations T after M1")
    prompts: int = setting(64, "new prompts written per iteration")
    n: int = setting(4, "candidate responses per prompt (N)")
    judge_samples: int = setting(3, "judgments per candidate (K)")
    judge_mode: str = setting("sample", "sample: K judgment texts, parsed and averaged; expected: the score "
                                        "digit's expected value", ("sample", "expected"))
    expected_after: str = setting("prefix", "expected mode reads the digit at once (prefix) or after a written "
                                            "justification (judgment)", ("prefix", "judgment"))
    judge_eval_modes: str = setting("both", "judge evaluations (eval/judge_m*.json) in both modes, or in the "
                                            "loop's alone", ("both", "loop"))
    temperature: float = setting(0.7, "sampling temperature of the candidates")
    top_p: float = setting(0.9, "nucleus sampling of the candidates")
    max_new_tokens: int = setting(256, "tokens per candidate")
    prompt_temperature: float = setting(0.6, "sampling temperature of prompt writing")
    prompt_top_p: float = setting(0.9, "nucleus sampling of prompt writing")
    judge_temperature: float = setting(0.7, "sampling temperature of the judge")
    judge_top_p: float = setting(0.9, "nucleus sampling of the judge")
    judge_max_tokens: int = setting(160, "tokens per judgment")
    length_control: bool = setting(False, "Meta-Rewarding's length control: the shortest of the best-scored "
                                          "candidates is chosen, the longest of the worst rejected")
    min_margin: float = setting(0.0, "a best - worst score gap this small or smaller is a tie, dropped "
                                     "(expected scores are continuous)")
    eval_prompts: int = setting(32, "held-out prompts of the head-to-head win rate of M_{t+1} over M_t")
    select_checkpoints: bool = setting(False, "M_{t+1} is the best DPO checkpoint by the fixed judge (the "
                                              "paper's), not the last")
    select_prompts: int = setting(253, "validation prompts of that selection: the first seed prompts")
    eval_max_tokens: int = setting(256, "tokens per answer in the head-to-head")
    seed: int = setting(0, "seed of the loop's sampling and judging (training's: sft.seed, dpo.seed)")
    seed_dir: str = setting(str(SEED_DIR), "folder of the seed data: ift.jsonl, eft_train.jsonl, eft_eval.jsonl")
    judge_template: str | None = setting(None, "judge prompt file with {instruction} and {response} (default: "
                                               "the paper's additive rubric, judge.DEFAULT_TEMPLATE)")
    prompt_writer: str | None = setting(None, "model directory that writes new prompts (default: M_t)")
    prompt_pool: str | None = setting(None, 'JSONL of {"prompt"} to draw new prompts from instead of writing '
                                            "them")
    eval_judge: str | None = setting(None, "model directory of the fixed judge of the head-to-head and of "
                                           "checkpoint selection (default: M1)")
    kv_cache_tokens: int = setting(65536, "KV cache of each generation engine, in tokens")
    max_num_seqs: int = setting(64, "sequences each generation engine decodes together")
    dtype: str = setting("auto", "dtype of generation and judging (auto: bf16 where the device computes it "
                                 "natively, else float32)", GENERATION_DTYPES)
    eft_target: str = setting("judgment", "what EFT teaches M1 to write as a judge: a justification, then the "
                                           "score line (judgment, the paper's), or the score line alone (score: "
                                           "the digit the expected mode reads at once)", EFT_TARGETS)
    eft_augment: int = setting(0, "graded EFT examples derived from each IFT seed record and added to M1's "
                                  "EFT data (srlm_engine/augment.py, as `srlm data eft-augment`); 0: none")
    eft_extra: str | None = setting(None, "more EFT training examples for M1, a JSONL file of eft_train.jsonl's "
                                          "form: a name in seed_dir (eft_near_topic.jsonl ships there) or a path")
    eft_share: float | None = setting(None, "EFT's share of M1's SFT records, the IFT seed records drawn "
                                            "(seeded) to make it so ('none': every IFT and EFT record)")
    sft: TrainConfig = setting(TrainConfig, "SFT of M0 on IFT + EFT, giving M1")
    dpo: TrainConfig = setting(TrainConfig, "DPO of each iteration, from M_t")

    def __post_init__(self):
        if isinstance(self.sft, dict):
            self.sft = TrainConfig.from_dict(self.sft, "sft")
        if isinstance(self.dpo, dict):
            self.dpo = TrainConfig.from_dict(self.dpo, "dpo")
        _none_words(self)
        _check_types(self)
        _check_choices(self)
        for name in ("iterations", "prompts", "n", "judge_samples", "max_new_tokens", "judge_max_tokens",
                     "eval_prompts", "eval_max_tokens", "kv_cache_tokens", "max_num_seqs", "select_prompts"):
            v = getattr(self, name)
            if v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.n < 2:
            raise ConfigError(f"n must be at least 2 to form a pair, got {self.n}")
        for name in ("temperature", "prompt_temperature", "judge_temperature"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("top_p", "prompt_top_p", "judge_top_p"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.eft_share is not None and not 0 < self.eft_share <= 1:
            raise ConfigError(f"eft_share must be in (0, 1], got {self.eft_share!r}")
        if self.eft_augment < 0:
            raise ConfigError(f"eft_augment must be >= 0, got {self.eft_augment!r}")
        if not 0 <= self.min_margin < 5:
            raise ConfigError(f"min_margin must be in [0, 5) (scores are 0 to 5), got {self.min_margin!r}")

    PRESETS = ("quick", "small", "paper")  # srlm_engine/configs/<name>.toml

    @classmethod
    def build(cls, preset: str | None = None, toml: dict | None = None, source: str = "config",
              **overrides) -> "LoopConfig":
        """preset < TOML file (named `source` in errors) < command-line overrides; `sft` / `dpo`
        tables merge key by key."""
        if preset and preset not in cls.PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(cls.PRESETS)}")
        d: dict = {}
        layers = [(f"preset {preset}", read_toml(preset) if preset else {}), (source, toml or {}),
                  ("flags", {k: v for k, v in overrides.items() if v is not None})]
        for name, layer in layers:
            for k, v in layer.items():
                if k not in cls.__dataclass_fields__:
                    raise ConfigError(f"{name}: unknown loop setting {k!r}")
                if k in ("sft", "dpo") and not isinstance(v, dict):
                    raise ConfigError(f"{k} must be a table of training settings, got {v!r}")
                d[k] = TrainConfig.layer(d.get(k, {}), v) if k in ("sft", "dpo") else v
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def m1_data(self) -> str:
        """What M1's SFT trains on: EFT alone where eft_share is 1, else IFT and EFT (the paper's)."""
        return "EFT alone" if self.eft_share == 1 else "IFT + EFT"


# ---------------------------------------------------------------------- TOML files

def shipped_config(name: str):
    """The config a preset name stands for, shipped inside the package: srlm_engine/configs/<name>.toml
    (an importlib.resources Traversable, readable from any install)."""
    from importlib.resources import files
    return files(__package__).joinpath("configs", f"{name}.toml")


def read_toml(name_or_path: str | Path) -> dict:
    """A settings file: a path, or the name of a shipped config (LoopConfig.PRESETS) where no file
    of that name exists. Errors name the file."""
    import tomllib
    path = Path(name_or_path)
    source = shipped_config(str(name_or_path)) if not path.exists() and name_or_path in LoopConfig.PRESETS else path
    try:
        with source.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML: {e}") from None
    except OSError as e:
        shipped = f" (shipped configs: {', '.join(LoopConfig.PRESETS)})" if isinstance(e, FileNotFoundError) else ""
        raise ConfigError(f"{source}: {e.strerror or e}{shipped}") from None


def to_toml(settings) -> str:
    """A settings dataclass as TOML that read_toml reads back to the same settings: plain settings
    first, then one table per nested dataclass (LoopConfig.sft, .dpo). TOML has no null: an unset
    number is "none", as on the command line; an unset path is a comment."""
    lines, tables = [], []
    for f in fields(settings):
        v = getattr(settings, f.name)
        if is_dataclass(v):
            tables.append((f.name, v))
        elif v is None:
            lines.append(f'{f.name} = "none"' if f.type in _NUMBER_OR_NONE else f"# {f.name} is unset")
        else:
            lines.append(f"{f.name} = {_toml_value(v)}")
    for name, v in tables:
        lines += ["", f"[{name}]", to_toml(v).rstrip("\n")]
    return "\n".join(lines) + "\n"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)  # 1e-06 and 0.5 read back exactly
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string escapes as JSON does
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")

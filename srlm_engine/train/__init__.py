"""Training: SFT and DPO over the fused kernels, one process or FSDP2 under torchrun.

    train.trainer.train_sft(model_dir, records, out_dir, cfg) -> OUT/model
    train.refs.compute_reference_logps(model_dir, pairs, max_seq_len, ...) -> pairs + ref log-probs
    train.trainer.train_dpo(model_dir, pairs_with_refs, out_dir, cfg) -> OUT/model
Files: batches (records -> tokens -> micro-batches), losses, optim (AdamW + schedule), parallel
(process groups, FSDP2), checkpoint (atomic HF checkpoints, resume), refs, metrics (the per-step
log under TRL's metric names, TensorBoard on request), trainer (the loop).
"""

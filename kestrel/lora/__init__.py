"""Many LoRA adapters on one base model (S-LoRA): PEFT adapters, their paging in the KV pool, batched low-rank math."""

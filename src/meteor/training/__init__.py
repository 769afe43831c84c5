"""Fine-tuning shared by sft, refine, self_train and merge: data encoding with answer-only labels
(:mod:`.data`), the accelerate training loop (:mod:`.loop`) over one :mod:`.session` per stage,
preference losses (:mod:`.preference`), LoRA (:mod:`.lora`) and their params (:mod:`.config`).
Import from the submodules: this file imports nothing, so a stage's deps hold only what it uses."""

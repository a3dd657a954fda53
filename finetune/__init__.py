"""Fine-tuning: dataset validation, LoRA/QLoRA training with PEFT, adapter publishing."""

"""Parameter-efficient fine-tuning: LoRA and QLoRA (lora.py)."""

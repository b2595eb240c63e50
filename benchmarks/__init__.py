"""Benchmarks of peft_lyco's LoHa/LoKr against PEFT's built-in LoHa/LoKr, lycoris-lora and the frozen base layer."""

"""Model definitions and builders used by peft_lyco (tiny SDXL pipeline, Anima DiT)."""

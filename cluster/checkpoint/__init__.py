"""HF-layout safetensors checkpoints: names, reading, writing the embedded random checkpoint."""

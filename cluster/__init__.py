"""moe-cluster: OpenAI-compatible chat completions for Mixtral-family MoE models, expert-parallel on Ray Serve."""

__version__ = "0.1.0"

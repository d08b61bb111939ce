"""Fused-MoE kernels for the expert shards.

`align` groups (token, expert) pairs by local expert (torch, any device), `fused_moe` holds the raw Triton kernels
and their launchers, `tuning` picks block sizes. Importing this package does not import Triton.
"""

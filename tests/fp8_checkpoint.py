"""FP8 checkpoints in the layout vLLM reads for Mixtral, written here from a bf16 one, independently of the
project's own quantization: every linear but the router gates and lm_head stored as float8_e4m3fn beside a float32
`weight_scale` (per tensor, a 0-d tensor as AutoFP8 saves it; or per output channel, [N, 1]), with static
activation scales `input_scale` when asked, and config.json's `quantization_config` declaring it."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
QUANTIZED = re.compile(r"(self_attn\.[qkvo]_proj|experts\.\d+\.w[123])\.weight$")


def write_fp8_checkpoint(source: Path, target: Path, per_channel: bool = False, static: bool = True) -> Path:
    shutil.copytree(source, target)
    file = target / "model.safetensors"
    tensors = load_file(str(file))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not QUANTIZED.search(name):
            out[name] = t
            continue
        w = t.float()
        scale = w.abs().amax(dim=1, keepdim=True) / E4M3_MAX if per_channel else w.abs().max() / E4M3_MAX
        out[name] = (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out[name + "_scale"] = scale.float()
        if static:
            out[name.removesuffix("weight") + "input_scale"] = torch.tensor(0.05)
    save_file(out, str(file), metadata={"format": "pt"})
    config = json.loads((target / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
        "ignored_layers": [f"model.layers.{i}.block_sparse_moe.gate" for i in range(config["num_hidden_layers"])],
    }
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target

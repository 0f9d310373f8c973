"""Which part of a transformer block a layer is: attention q/k/v/out, MLP up/down.

A budget on a transformer spreads its cut over dozens of MatMuls; users want to see whether it
went into the attention projections or the MLPs, and in which block. Exporters name the nodes
after the framework's modules, and the module names are conventional, so the role is read from
the node name (Hugging Face BERT/RoBERTa/ViT/DistilBERT/GPT-2/Llama/T5 spellings). A layer whose
name matches none is "other". The block is the first ``layer.N`` / ``layers.N`` / ``h.N`` /
``block.N`` / ``blocks.N`` in the name.
"""

from __future__ import annotations

import re

# (role, pattern over the lower-cased node name); the first match wins, so the attention output
# is tried before the MLP's "output" (BERT's attention/output/dense vs output/dense).
ROLES = (
    ("attention q", r"(query|q_proj|q_lin|selfattention/q\b|attention/q\b)"),
    ("attention k", r"(key|k_proj|k_lin|selfattention/k\b|attention/k\b)"),
    ("attention v", r"(value|v_proj|v_lin|selfattention/v\b|attention/v\b)"),
    ("attention qkv", r"(c_attn|qkv|in_proj)"),
    ("attention out", r"(attention/output|out_proj|o_proj|out_lin|attn/c_proj|attention/o\b)"),
    ("MLP up", r"(intermediate|up_proj|gate_proj|fc1|c_fc|lin1|densereludense/wi|mlp/fc_in)"),
    ("MLP down", r"(/output/dense|down_proj|fc2|mlp/c_proj|lin2|densereludense/wo|mlp/fc_out)"),
)
_ROLES = [(role, re.compile(pattern)) for role, pattern in ROLES]
_BLOCK = re.compile(r"(?:^|[/._])(?:layer|layers|h|block|blocks)[._/](\d+)(?:[/._]|$)")


def block_role(name: str) -> str:
    """The layer's part of a transformer block, or ``"other"``."""
    lower = name.lower()
    for role, pattern in _ROLES:
        if pattern.search(lower):
            return role
    return "other"


def block_index(name: str) -> int | None:
    """The number of the transformer block the layer belongs to (None: not found in its name)."""
    match = _BLOCK.search(name.lower())
    return int(match.group(1)) if match else None

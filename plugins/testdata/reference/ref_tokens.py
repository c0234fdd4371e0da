"""Prompt ids for the goldens (NumPy only, shared by ref.py and tokens.py)."""
import numpy as np


def make_tokens(g, n, seed):
    """n seeded ids drawn from the normal tokens (token_type 1) of the model's vocabulary."""
    V = int(g.tensors["token_embd.weight"].ne[1])
    types = g.get("tokenizer.ggml.token_type")
    ok = np.arange(V)
    if types is not None and len(types) >= V:
        ok = np.array([i for i in range(V) if types[i] == 1])
    if len(ok) == 0:
        ok = np.arange(V)
    rng = np.random.default_rng(seed)
    return [int(x) for x in rng.choice(ok, size=n, replace=True)]

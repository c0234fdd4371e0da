#!/usr/bin/env python3
"""Write small random GGUFs (llama.cpp names and layouts) for a self-test of ref.py before sdk/synth's
files exist: gpt-oss (MXFP4 experts, Q8_0 attention, sinks, YaRN, sliding window) and llama (GQA,
rope_freqs). Not goldens: the goldens use sdk/synth's files. Usage: smoke.py OUT_DIR
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "host", "defaultmodel", "train"))
import gguf_writer as gw  # noqa: E402


def vocab(w, V):
    toks = ["<|endoftext|>"] + ["t%d" % i for i in range(1, V)]
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.tokens", toks)
    w.add("tokenizer.ggml.token_type", [3] + [1] * (V - 1))
    w.add("tokenizer.ggml.merges", [])


def mxfp4(rng, ne):
    n_blocks = int(np.prod(ne)) // 32
    blk = np.empty((n_blocks, 17), np.uint8)
    blk[:, 0] = rng.integers(119, 124, n_blocks)
    blk[:, 1:] = rng.integers(0, 256, (n_blocks, 16))
    return blk.tobytes()


def gpt_oss(path, rng, V=96, d=64, L=2, H=4, KV=2, hd=16, ff=64, E=4, k=2, window=8):
    w = gw.Writer()
    w.add("general.architecture", "gpt-oss")
    A = "gpt-oss."
    for key, v in (("context_length", 256), ("embedding_length", d), ("feed_forward_length", ff),
                   ("block_count", L), ("attention.head_count", H), ("attention.head_count_kv", KV),
                   ("attention.key_length", hd), ("attention.value_length", hd), ("expert_count", E),
                   ("expert_used_count", k), ("expert_feed_forward_length", ff), ("attention.sliding_window", window),
                   ("rope.scaling.original_context_length", 64)):
        w.add(A + key, v)
    w.add(A + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add(A + "rope.freq_base", 150000.0)
    w.add(A + "rope.scaling.type", "yarn")
    w.add(A + "rope.scaling.factor", 32.0)
    vocab(w, V)
    n = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", n(V, d), gw.Q8_0)
    w.add_tensor("output_norm.weight", 1 + n(d), gw.F32)
    w.add_tensor("output.weight", n(V, d), gw.Q8_0)
    for i in range(L):
        b = "blk.%d." % i
        w.add_tensor(b + "attn_norm.weight", 1 + n(d), gw.F32)
        w.add_tensor(b + "post_attention_norm.weight", 1 + n(d), gw.F32)
        for nm, o in (("attn_q", H * hd), ("attn_k", KV * hd), ("attn_v", KV * hd)):
            w.add_tensor(b + nm + ".weight", n(o, d), gw.Q8_0)
            w.add_tensor(b + nm + ".bias", n(o), gw.F32)
        w.add_tensor(b + "attn_output.weight", n(d, H * hd), gw.Q8_0)
        w.add_tensor(b + "attn_output.bias", n(d), gw.F32)
        w.add_tensor(b + "attn_sinks.weight", n(H), gw.F32)
        w.add_tensor(b + "ffn_gate_inp.weight", n(E, d), gw.F32)
        w.add_tensor(b + "ffn_gate_inp.bias", n(E), gw.F32)
        w.add_raw(b + "ffn_gate_exps.weight", [d, ff, E], 39, mxfp4(rng, [d, ff, E]))
        w.add_raw(b + "ffn_up_exps.weight", [d, ff, E], 39, mxfp4(rng, [d, ff, E]))
        w.add_raw(b + "ffn_down_exps.weight", [ff, d, E], 39, mxfp4(rng, [ff, d, E]))
        w.add_tensor(b + "ffn_gate_exps.bias", n(E, ff), gw.F32)
        w.add_tensor(b + "ffn_up_exps.bias", n(E, ff), gw.F32)
        w.add_tensor(b + "ffn_down_exps.bias", n(E, d), gw.F32)
    w.write(path)


def llama(path, rng, V=96, d=64, L=2, H=4, KV=2, ff=128):
    hd = d // H
    w = gw.Writer()
    w.add("general.architecture", "llama")
    A = "llama."
    for key, v in (("context_length", 256), ("embedding_length", d), ("feed_forward_length", ff),
                   ("block_count", L), ("attention.head_count", H), ("attention.head_count_kv", KV),
                   ("rope.dimension_count", hd)):
        w.add(A + key, v)
    w.add(A + "attention.layer_norm_rms_epsilon", 1e-5)
    w.add(A + "rope.freq_base", 500000.0)
    vocab(w, V)
    n = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", n(V, d), gw.F16)
    w.add_tensor("output_norm.weight", 1 + n(d), gw.F32)
    w.add_tensor("rope_freqs.weight", np.linspace(1, 8, hd // 2).astype(np.float32), gw.F32)
    for i in range(L):
        b = "blk.%d." % i
        w.add_tensor(b + "attn_norm.weight", 1 + n(d), gw.F32)
        w.add_tensor(b + "ffn_norm.weight", 1 + n(d), gw.F32)
        w.add_tensor(b + "attn_q.weight", n(H * hd, d), gw.Q8_0)
        w.add_tensor(b + "attn_k.weight", n(KV * hd, d), gw.Q8_0)
        w.add_tensor(b + "attn_v.weight", n(KV * hd, d), gw.Q8_0)
        w.add_tensor(b + "attn_output.weight", n(d, H * hd), gw.Q8_0)
        w.add_tensor(b + "ffn_gate.weight", n(ff, d), gw.F32)
        w.add_tensor(b + "ffn_up.weight", n(ff, d), gw.F16)
        w.add_tensor(b + "ffn_down.weight", n(d, ff), gw.Q8_0)
    w.write(path)


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(5)
    gpt_oss(os.path.join(out, "smoke-gpt-oss.gguf"), rng)
    llama(os.path.join(out, "smoke-llama.gguf"), rng)
    print("wrote smoke GGUFs to", out)

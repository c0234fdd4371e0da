#!/usr/bin/env python3
"""transformers reference for orch's golden logits (issue 4, item 4).

Loads a GGUF written by `orch-host synth` (llama.cpp tensor names and layouts) into the matching
transformers model -- GptOssForCausalLM, GPT2LMHeadModel or LlamaForCausalLM -- built from a config
derived from the GGUF metadata, runs it in float32 on the CPU with eager attention, and writes:

  <name>.logits.npy   float32 [n_tokens, n_vocab]: logits of every prompt position
  <name>.greedy.json  JSON array: the 64 token ids greedy decoding appends to the prompt
  <name>.meta.json    diagnostics: config used, float64 check, smallest top-1/top-2 logit margins

The prompt comes from <name>.tokens.json (JSON array of ids); with --make-tokens it is created first
(seeded, in-vocab, normal tokens only).

Layout conversions (llama.cpp GGUF -> transformers):
  * every 2-D GGUF weight ne=[in, out] is read as [out, in] = nn.Linear.weight;
  * gpt-oss: ffn_gate_exps/ffn_up_exps [E, ff, d] are interleaved into gate_up_proj (gate = even
    columns) in transformers' expert layout, biases likewise; down [E, d, ff] -> down_proj. The layout
    is checked at run time: the loaded MoE block of layer 0 must match a NumPy MoE computed straight
    from the GGUF tensors, else the other layouts transformers has used are tried;
  * gpt-oss RoPE: YaRN (factor, original context, beta_fast/beta_slow, truncate=False); the model's
    inv_freq and attention scaling are checked against an independent computation;
  * llama: llama.cpp's converter permutes the rows of attn_q/attn_k per head; they are un-permuted;
    rope_freqs.weight (Llama 3.x) divides the inverse frequencies, which are set into the model;
  * GPT-2: transformers' Conv1D stores [in, out], so every matrix is transposed.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reader import GGUFFile, GGUFError  # noqa: E402
from ref_tokens import make_tokens  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402


def log(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------- helpers

def make_config(cls, **kw):
    """Build a transformers config; v5 takes rope_parameters, v4 rope_theta/rope_scaling."""
    try:
        return cls(**kw)
    except TypeError:
        rp = kw.pop("rope_parameters", None)
        if rp is not None:
            rp = dict(rp)
            kw["rope_theta"] = rp.pop("rope_theta")
            if rp.get("rope_type", "default") != "default":
                kw["rope_scaling"] = rp
        return cls(**kw)


def build_model(cls, config):
    """Instantiate cls in float32 with eager attention (and eager experts, where transformers has
    pluggable expert kernels); fails loudly when eager cannot be set."""
    for attr in ("_attn_implementation", "_experts_implementation"):
        try:
            setattr(config, attr, "eager")
        except Exception:
            pass
    model = None
    errors = []
    for kwargs in ({"attn_implementation": "eager", "experts_implementation": "eager", "dtype": torch.float32},
                   {"attn_implementation": "eager", "dtype": torch.float32},
                   {"attn_implementation": "eager", "torch_dtype": torch.float32},
                   {"attn_implementation": "eager"}):
        try:
            model = cls._from_config(config, **kwargs)
            break
        except Exception as e:  # unknown keyword in this transformers version: try the next form
            errors.append(repr(e))
    if model is None:
        log("  _from_config failed (%s); constructing directly" % "; ".join(errors))
        model = cls(config)
    model = model.float().eval()
    if hasattr(model.config, "_experts_implementation"):
        try:
            model.config._experts_implementation = "eager"
        except Exception:
            pass
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != "eager":
        raise RuntimeError("attention implementation is %r, want eager" % impl)
    return model


def assign(model, params):
    """Copy params (name -> np.ndarray) into model; every parameter must be covered exactly."""
    named = dict(model.named_parameters())
    missing = [n for n in named if n not in params]
    extra = [n for n in params if n not in named]
    if missing or extra:
        raise RuntimeError("parameter mapping mismatch: missing %s, unexpected %s" % (missing[:8], extra[:8]))
    with torch.no_grad():
        for n, p in named.items():
            a = np.ascontiguousarray(params[n], dtype=np.float32)
            if tuple(p.shape) != a.shape:
                raise RuntimeError("%s: model shape %s, GGUF gives %s" % (n, tuple(p.shape), a.shape))
            p.copy_(torch.from_numpy(a))


def tied(model):
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


# ---------------------------------------------------------------------------- gpt-oss

def yarn_inv_freq(dim, base, factor, orig, beta_fast, beta_slow):
    """YaRN as transformers' _compute_yarn_parameters with truncate=False (no rounding)."""
    pos = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    inv_extra = 1.0 / pos
    inv_inter = 1.0 / (factor * pos)

    def corr(nrot):
        return (dim * math.log(orig / (nrot * 2 * math.pi))) / (2 * math.log(base))

    low, high = max(corr(beta_fast), 0.0), min(corr(beta_slow), dim - 1.0)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extra = 1 - ramp
    inv = inv_inter * (1 - extra) + inv_extra * extra
    return inv, 0.1 * math.log(factor) + 1.0


def moe_numpy(x, Wr, br, Wg, bg, Wu, bu, Wd, bd, k, limit=7.0, alpha=1.702):
    x = x.astype(np.float64)
    logits = x @ Wr.T + br
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        idx = np.argsort(-logits[t], kind="stable")[:k]
        w = np.exp(logits[t, idx] - logits[t, idx].max())
        w /= w.sum()
        for e, we in zip(idx, w):
            g = np.minimum(x[t] @ Wg[e].T + bg[e], limit)
            u = np.clip(x[t] @ Wu[e].T + bu[e], -limit, limit)
            h = (u + 1) * g / (1 + np.exp(-alpha * g))
            out[t] += we * (h @ Wd[e].T + bd[e])
    return out


def expert_layouts(Wg, Wu, bg, bu, Wd, gu_shape, gub_shape, dp_shape):
    """Candidate (name, gate_up, gate_up_bias, down) arrays for the layouts transformers has used."""
    E, ff, d = Wg.shape
    cands = []
    for inter in (True, False):
        if inter:
            gu_io = np.empty((E, d, 2 * ff), np.float32)
            gu_io[:, :, 0::2] = Wg.transpose(0, 2, 1)
            gu_io[:, :, 1::2] = Wu.transpose(0, 2, 1)
            gub = np.empty((E, 2 * ff), np.float32)
            gub[:, 0::2], gub[:, 1::2] = bg, bu
        else:
            gu_io = np.concatenate([Wg.transpose(0, 2, 1), Wu.transpose(0, 2, 1)], axis=2)
            gub = np.concatenate([bg, bu], axis=1)
        for gu_in_out in (True, False):
            gu = gu_io if gu_in_out else gu_io.transpose(0, 2, 1)
            for dn_in_out in (True, False):
                dn = Wd.transpose(0, 2, 1) if dn_in_out else Wd  # [E, ff, d] or [E, d, ff]
                if gu.shape == tuple(gu_shape) and dn.shape == tuple(dp_shape) and gub.shape == tuple(gub_shape):
                    name = "%s/%s/%s" % ("interleaved" if inter else "halves",
                                         "gate_up[in,out]" if gu_in_out else "gate_up[out,in]",
                                         "down[in,out]" if dn_in_out else "down[out,in]")
                    cands.append((name, gu, gub, dn))
    return cands


def load_gpt_oss(g):
    A = lambda s, d=None: g.arch_get(s, d)  # noqa: E731
    n_layer = int(A("block_count"))
    n_head = int(A("attention.head_count"))
    n_kv = int(A("attention.head_count_kv"))
    emb = g.tensor("token_embd.weight")
    V, d = emb.shape
    q0 = g.tensors["blk.0.attn_q.weight"].ne
    head_dim = int(A("attention.key_length", q0[1] // n_head))
    Wg0 = g.tensors["blk.0.ffn_gate_exps.weight"].ne  # [d, ff, E]
    ff, E = int(Wg0[1]), int(Wg0[2])
    k = int(A("expert_used_count"))
    if int(A("expert_count", E)) != E:
        raise GGUFError("expert_count %s != ffn_gate_exps experts %d" % (A("expert_count"), E))
    window = A("attention.sliding_window")
    theta = float(A("rope.freq_base", 150000.0))
    stype = A("rope.scaling.type", "none")
    rope = {"rope_type": "default", "rope_theta": theta}
    yarn = None
    if stype == "yarn":
        yarn = dict(factor=float(A("rope.scaling.factor")),
                    orig=int(A("rope.scaling.original_context_length")),
                    beta_fast=float(A("rope.scaling.yarn_beta_fast", 32.0)),
                    beta_slow=float(A("rope.scaling.yarn_beta_slow", 1.0)))
        rope = {"rope_type": "yarn", "rope_theta": theta, "factor": yarn["factor"],
                "original_max_position_embeddings": yarn["orig"], "beta_fast": yarn["beta_fast"],
                "beta_slow": yarn["beta_slow"], "truncate": False}
    elif stype not in ("none", None):
        raise GGUFError("gpt-oss: unsupported rope.scaling.type %r" % stype)
    has_output = g.has("output.weight")
    if window:
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layer)]
    else:
        layer_types = ["full_attention"] * n_layer
    cfg = make_config(
        transformers.GptOssConfig,
        vocab_size=V, hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
        num_local_experts=E, num_experts_per_tok=k,
        rms_norm_eps=float(A("attention.layer_norm_rms_epsilon", 1e-5)),
        sliding_window=int(window) if window else None, layer_types=layer_types,
        max_position_embeddings=int(A("context_length", 4096)),
        rope_parameters=rope, attention_bias=True, tie_word_embeddings=not has_output,
        attention_dropout=0.0,
    )
    model = build_model(transformers.GptOssForCausalLM, cfg)

    def t(name):
        return g.tensor(name)

    def t_any(*names):
        for nm in names:
            if g.has(nm):
                return g.tensor(nm)
        raise GGUFError("missing tensor: one of %s" % (names,))

    P = {"model.embed_tokens.weight": emb, "model.norm.weight": t("output_norm.weight")}
    if has_output:
        P["lm_head.weight"] = t("output.weight")
    experts = []
    for i in range(n_layer):
        b, m = "blk.%d." % i, "model.layers.%d." % i
        P[m + "input_layernorm.weight"] = t(b + "attn_norm.weight")
        P[m + "post_attention_layernorm.weight"] = t_any(b + "post_attention_norm.weight", b + "ffn_norm.weight")
        for hf, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output")):
            P[m + "self_attn.%s.weight" % hf] = t(b + gg + ".weight")
            P[m + "self_attn.%s.bias" % hf] = t(b + gg + ".bias")
        P[m + "self_attn.sinks"] = t_any(b + "attn_sinks.weight", b + "attn_sinks").reshape(-1)
        P[m + "mlp.router.weight"] = t(b + "ffn_gate_inp.weight")
        P[m + "mlp.router.bias"] = t(b + "ffn_gate_inp.bias")
        experts.append(dict(Wg=t(b + "ffn_gate_exps.weight"), Wu=t(b + "ffn_up_exps.weight"),
                            Wd=t(b + "ffn_down_exps.weight"), bg=t(b + "ffn_gate_exps.bias"),
                            bu=t(b + "ffn_up_exps.bias"), bd=t(b + "ffn_down_exps.bias")))
    named = dict(model.named_parameters())
    ex0 = "model.layers.0.mlp.experts."
    cands = expert_layouts(experts[0]["Wg"], experts[0]["Wu"], experts[0]["bg"], experts[0]["bu"],
                           experts[0]["Wd"], named[ex0 + "gate_up_proj"].shape,
                           named[ex0 + "gate_up_proj_bias"].shape, named[ex0 + "down_proj"].shape)
    if not cands:
        raise RuntimeError("no known expert layout fits transformers' shapes %s" %
                           [tuple(named[ex0 + s].shape) for s in ("gate_up_proj", "gate_up_proj_bias", "down_proj")])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, d)).astype(np.float32)
    e0 = experts[0]
    want = moe_numpy(x, P["model.layers.0.mlp.router.weight"], P["model.layers.0.mlp.router.bias"],
                     e0["Wg"], e0["bg"], e0["Wu"], e0["bu"], e0["Wd"], e0["bd"], k)
    chosen = None
    for ci, (name, _, _, _) in enumerate(cands):
        P2 = dict(P)
        for i in range(n_layer):
            ce = expert_layouts(experts[i]["Wg"], experts[i]["Wu"], experts[i]["bg"], experts[i]["bu"],
                                experts[i]["Wd"], named[ex0 + "gate_up_proj"].shape,
                                named[ex0 + "gate_up_proj_bias"].shape, named[ex0 + "down_proj"].shape)[ci]
            m = "model.layers.%d.mlp.experts." % i
            P2[m + "gate_up_proj"], P2[m + "gate_up_proj_bias"], P2[m + "down_proj"] = ce[1], ce[2], ce[3]
            P2[m + "down_proj_bias"] = experts[i]["bd"]
        assign(model, P2)
        with torch.no_grad():
            got = model.model.layers[0].mlp(torch.from_numpy(x)[None])
        if isinstance(got, tuple):
            got = got[0]
        got = got.reshape(x.shape).double().numpy()
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        log("  expert layout %-45s MoE rel err vs NumPy %.3e" % (name, err))
        if err < 1e-4:
            chosen = name
            break
    if chosen is None:
        raise RuntimeError("no expert layout reproduces the NumPy MoE; see errors above")
    # RoPE check
    if yarn:
        inv, attn = yarn_inv_freq(head_dim, theta, yarn["factor"], yarn["orig"], yarn["beta_fast"], yarn["beta_slow"])
    else:
        inv, attn = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim), 1.0
    n_rot = 0
    for name, mod in model.named_modules():
        if hasattr(mod, "inv_freq") and isinstance(getattr(mod, "inv_freq"), torch.Tensor):
            got_inv = mod.inv_freq.double().cpu().numpy()
            got_attn = float(getattr(mod, "attention_scaling", 1.0))
            e1 = np.abs(got_inv - inv).max() / np.abs(inv).max()
            log("  rope %s: inv_freq max rel dev %.2e, attention_scaling %.6f (want %.6f)" % (name or "<root>", e1, got_attn, attn))
            if e1 > 1e-6 or abs(got_attn - attn) > 1e-6:
                raise RuntimeError("transformers RoPE differs from YaRN(truncate=False) computed here")
            n_rot += 1
    if n_rot == 0:
        raise RuntimeError("no rotary embedding module found to check")
    info = dict(arch="gpt-oss", layers=n_layer, d=d, heads=n_head, kv_heads=n_kv, head_dim=head_dim, ff=ff,
                experts=E, top_k=k, window=window, rope=rope, expert_layout=chosen, vocab=V,
                tied=not has_output, layer_types=layer_types)
    return model, info


# ---------------------------------------------------------------------------- gpt2

def load_gpt2(g):
    A = lambda s, d=None: g.arch_get(s, d)  # noqa: E731
    n_layer = int(A("block_count"))
    n_head = int(A("attention.head_count"))
    emb = g.tensor("token_embd.weight")
    V, d = emb.shape
    pos = g.tensor("position_embd.weight")
    ff = int(g.tensors["blk.0.ffn_up.weight"].ne[1])
    has_output = g.has("output.weight")
    cfg = transformers.GPT2Config(
        vocab_size=V, n_positions=pos.shape[0], n_embd=d, n_layer=n_layer, n_head=n_head, n_inner=ff,
        layer_norm_epsilon=float(A("attention.layer_norm_epsilon", 1e-5)), activation_function="gelu_new",
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=not has_output,
    )
    model = build_model(transformers.GPT2LMHeadModel, cfg)
    t = g.tensor
    P = {"transformer.wte.weight": emb, "transformer.wpe.weight": pos,
         "transformer.ln_f.weight": t("output_norm.weight"), "transformer.ln_f.bias": t("output_norm.bias")}
    if has_output:
        P["lm_head.weight"] = t("output.weight")
    for i in range(n_layer):
        b, m = "blk.%d." % i, "transformer.h.%d." % i
        P[m + "ln_1.weight"], P[m + "ln_1.bias"] = t(b + "attn_norm.weight"), t(b + "attn_norm.bias")
        P[m + "ln_2.weight"], P[m + "ln_2.bias"] = t(b + "ffn_norm.weight"), t(b + "ffn_norm.bias")
        P[m + "attn.c_attn.weight"], P[m + "attn.c_attn.bias"] = t(b + "attn_qkv.weight").T, t(b + "attn_qkv.bias")
        P[m + "attn.c_proj.weight"], P[m + "attn.c_proj.bias"] = t(b + "attn_output.weight").T, t(b + "attn_output.bias")
        P[m + "mlp.c_fc.weight"], P[m + "mlp.c_fc.bias"] = t(b + "ffn_up.weight").T, t(b + "ffn_up.bias")
        P[m + "mlp.c_proj.weight"], P[m + "mlp.c_proj.bias"] = t(b + "ffn_down.weight").T, t(b + "ffn_down.bias")
    assign(model, P)
    info = dict(arch="gpt2", layers=n_layer, d=d, heads=n_head, ff=ff, vocab=V, n_positions=pos.shape[0],
                tied=not has_output)
    return model, info


# ---------------------------------------------------------------------------- llama

def unpermute(w, n_head):
    """Invert llama.cpp's convert_hf_to_gguf permute() of q/k rows (per head: pairs -> halves)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_llama(g):
    A = lambda s, d=None: g.arch_get(s, d)  # noqa: E731
    n_layer = int(A("block_count"))
    n_head = int(A("attention.head_count"))
    n_kv = int(A("attention.head_count_kv", n_head))
    emb = g.tensor("token_embd.weight")
    V, d = emb.shape
    q0 = g.tensors["blk.0.attn_q.weight"].ne
    head_dim = int(A("attention.key_length", q0[1] // n_head))
    ff = int(g.tensors["blk.0.ffn_gate.weight"].ne[1])
    theta = float(A("rope.freq_base", 10000.0))
    stype = A("rope.scaling.type", "none")
    if stype not in ("none", None):
        raise GGUFError("llama: rope.scaling.type %r not handled by the reference" % stype)
    has_output = g.has("output.weight")
    cfg = make_config(
        transformers.LlamaConfig,
        vocab_size=V, hidden_size=d, intermediate_size=ff, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv, head_dim=head_dim,
        rms_norm_eps=float(A("attention.layer_norm_rms_epsilon", 1e-5)),
        max_position_embeddings=int(A("context_length", 4096)),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=not has_output, attention_bias=False, mlp_bias=False, attention_dropout=0.0,
    )
    model = build_model(transformers.LlamaForCausalLM, cfg)
    t = g.tensor
    P = {"model.embed_tokens.weight": emb, "model.norm.weight": t("output_norm.weight")}
    if has_output:
        P["lm_head.weight"] = t("output.weight")
    for i in range(n_layer):
        b, m = "blk.%d." % i, "model.layers.%d." % i
        P[m + "input_layernorm.weight"] = t(b + "attn_norm.weight")
        P[m + "post_attention_layernorm.weight"] = t(b + "ffn_norm.weight")
        P[m + "self_attn.q_proj.weight"] = unpermute(t(b + "attn_q.weight"), n_head)
        P[m + "self_attn.k_proj.weight"] = unpermute(t(b + "attn_k.weight"), n_kv)
        P[m + "self_attn.v_proj.weight"] = t(b + "attn_v.weight")
        P[m + "self_attn.o_proj.weight"] = t(b + "attn_output.weight")
        P[m + "mlp.gate_proj.weight"] = t(b + "ffn_gate.weight")
        P[m + "mlp.up_proj.weight"] = t(b + "ffn_up.weight")
        P[m + "mlp.down_proj.weight"] = t(b + "ffn_down.weight")
    assign(model, P)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    rope_freqs = None
    if g.has("rope_freqs.weight"):
        rope_freqs = g.tensor("rope_freqs.weight").astype(np.float64).reshape(-1)
        if rope_freqs.shape[0] != head_dim // 2:
            raise GGUFError("rope_freqs.weight has %d entries, want %d" % (rope_freqs.shape[0], head_dim // 2))
        inv = inv / rope_freqs
    n_rot = 0
    for name, mod in model.named_modules():
        if hasattr(mod, "inv_freq") and isinstance(getattr(mod, "inv_freq"), torch.Tensor):
            new = torch.tensor(inv, dtype=mod.inv_freq.dtype)
            if rope_freqs is not None:
                mod.inv_freq.copy_(new)
                if hasattr(mod, "original_inv_freq"):
                    mod.original_inv_freq = new.clone()
            dev = (mod.inv_freq.double() - torch.tensor(inv)).abs().max().item() / inv.max()
            log("  rope %s: inv_freq max rel dev %.2e%s" % (name or "<root>", dev, " (rope_freqs applied)" if rope_freqs is not None else ""))
            if dev > 1e-6 or abs(float(getattr(mod, "attention_scaling", 1.0)) - 1.0) > 1e-9:
                raise RuntimeError("llama RoPE frequencies differ from base^(-2i/d)[/rope_freqs]")
            n_rot += 1
    if n_rot == 0:
        raise RuntimeError("no rotary embedding module found")
    info = dict(arch="llama", layers=n_layer, d=d, heads=n_head, kv_heads=n_kv, head_dim=head_dim, ff=ff,
                vocab=V, rope_theta=theta, rope_freqs=rope_freqs is not None, tied=not has_output)
    return model, info


LOADERS = {"gpt-oss": load_gpt_oss, "gpt2": load_gpt2, "llama": load_llama}


# ---------------------------------------------------------------------------- main

def forward_logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0]


def greedy(model, ids, steps):
    seq, margins = list(ids), []
    for _ in range(steps):
        lg = forward_logits(model, seq)[-1].double().numpy()
        top2 = np.sort(lg)[-2:]
        margins.append(float(top2[1] - top2[0]))
        seq.append(int(np.argmax(lg)))
    return seq[len(ids):], margins


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("--prefix", help="output prefix (default: the gguf path without .gguf)")
    ap.add_argument("--make-tokens", type=int, default=0, help="create <prefix>.tokens.json with N ids if absent")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--ours", help="optional: our logits .npy to compare against")
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    prefix = a.prefix or (a.gguf[:-5] if a.gguf.endswith(".gguf") else a.gguf)
    name = os.path.basename(prefix)
    g = GGUFFile(a.gguf)
    log("%s: arch %s, %d tensors, transformers %s, torch %s" % (name, g.arch, len(g.tensors), transformers.__version__, torch.__version__))
    if g.arch not in LOADERS:
        raise SystemExit("%s: unsupported architecture %r" % (a.gguf, g.arch))
    tok_path = prefix + ".tokens.json"
    if not os.path.exists(tok_path):
        if not a.make_tokens:
            raise SystemExit("%s missing (use --make-tokens N)" % tok_path)
        with open(tok_path, "w") as f:
            json.dump(make_tokens(g, a.make_tokens, a.seed), f)
            f.write("\n")
    with open(tok_path) as f:
        ids = [int(x) for x in json.load(f)]
    model, info = LOADERS[g.arch](g)
    if info["tied"] != tied(model):
        raise RuntimeError("tie_word_embeddings: GGUF says tied=%s, model has tied=%s" % (info["tied"], tied(model)))
    logits = forward_logits(model, ids).float().numpy()
    if not np.all(np.isfinite(logits)):
        raise RuntimeError("non-finite logits")
    cont, margins = greedy(model, ids, a.steps)
    # float64 run: how far float32 itself is from the exact answer (noise floor of the reference)
    meta = dict(name=name, info=info, prompt_len=len(ids), steps=a.steps,
                transformers=transformers.__version__, torch=torch.__version__,
                logits_std=float(logits.std()), min_greedy_margin=float(min(margins)),
                min_prompt_margin=float(np.min(np.diff(np.sort(logits, axis=1)[:, -2:], axis=1))))
    try:
        m64 = model.double()
        l64 = forward_logits(m64, ids).numpy()
        meta["f32_vs_f64_rel_err"] = float(np.linalg.norm(logits - l64) / np.linalg.norm(l64))
        c64, _ = greedy(m64, ids, a.steps)
        meta["greedy_same_in_f64"] = c64 == cont
    except Exception as e:  # diagnostics only
        meta["f64_error"] = repr(e)
    np.save(prefix + ".logits.npy", logits.astype(np.float32))
    with open(prefix + ".greedy.json", "w") as f:
        json.dump(cont, f)
        f.write("\n")
    with open(prefix + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
        f.write("\n")
    log("  logits %s std %.3f; f32 vs f64 rel err %s; min greedy margin %.4f; greedy %s..." % (
        logits.shape, meta["logits_std"], meta.get("f32_vs_f64_rel_err"), meta["min_greedy_margin"], cont[:8]))
    if a.ours:
        ours = np.load(a.ours)
        err = np.linalg.norm(ours - logits) / np.linalg.norm(logits)
        log("  ours vs reference: rel err %.3e" % err)


if __name__ == "__main__":
    main()

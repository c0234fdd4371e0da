#!/usr/bin/env python3
"""Train orch's embedded default model: a ~7M-parameter GPT-2 on Jane Austen's novels.

Runs on the GPU box (PyTorch 2.11, transformers 5.17, tokenizers 0.23; nothing downloaded):
  1. a byte-level BPE tokenizer (GPT-2 pre-tokenization, <|endoftext|> special) on train.txt;
  2. GPT2LMHeadModel (6 layers, 256 wide, 8 heads, context 512, tied embeddings) trained with AdamW,
     warmup + cosine LR, bf16 autocast; the best validation checkpoint is kept;
  3. export to a llama.cpp-layout `gpt2` GGUF (Q8_0 matrices, F32 norms/biases/positions), then the
     file is read back with the reference GGUF reader, loaded into a fresh GPT2LMHeadModel and compared
     with the trained model (quantization error), and samples are generated from the exported weights.

Usage: train.py DATA_DIR OUT_DIR [--steps N]   (DATA_DIR holds train.txt and val.txt)
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "..", "plugins", "testdata", "reference"))
import gguf_writer as gw  # noqa: E402

EOT = "<|endoftext|>"
NAME = "orch-austen-gpt2-7m"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def log(f, *a):
    s = " ".join(str(x) for x in a)
    print(s, flush=True)
    f.write(s + "\n")
    f.flush()


def train_tokenizer(text, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = [d for d in text.split(EOT) if d]
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode(tok, text, eot_id):
    ids = []
    for d in text.split(EOT):
        if d:
            ids.extend(tok.encode(d).ids)
            ids.append(eot_id)
    return np.array(ids, dtype=np.int64)


def vocab_and_merges(tok):
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    tokens = [None] * len(vocab)
    for s, i in vocab.items():
        tokens[i] = s
    for at in spec.get("added_tokens", []):
        if at["id"] >= len(tokens):
            tokens.extend([None] * (at["id"] + 1 - len(tokens)))
        tokens[at["id"]] = at["content"]
    if any(t is None for t in tokens):
        raise RuntimeError("vocabulary has holes")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def export_gguf(path, model, tok, cfg, eot_id):
    tokens, merges = vocab_and_merges(tok)
    if len(tokens) != cfg.vocab_size:
        raise RuntimeError("tokenizer has %d tokens, model %d" % (len(tokens), cfg.vocab_size))
    w = gw.Writer()
    w.add("general.architecture", "gpt2")
    w.add("general.name", NAME)
    w.add("general.license", "MIT")
    w.add("general.file_type", 7)  # LLAMA_FTYPE_MOSTLY_Q8_0
    w.add("gpt2.context_length", cfg.n_positions)
    w.add("gpt2.embedding_length", cfg.n_embd)
    w.add("gpt2.feed_forward_length", cfg.n_inner or 4 * cfg.n_embd)
    w.add("gpt2.block_count", cfg.n_layer)
    w.add("gpt2.attention.head_count", cfg.n_head)
    w.add("gpt2.attention.layer_norm_epsilon", float(cfg.layer_norm_epsilon))
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.pre", "gpt-2")
    w.add("tokenizer.ggml.tokens", tokens)
    w.add("tokenizer.ggml.token_type", [3 if t == EOT else 1 for t in tokens])
    w.add("tokenizer.ggml.merges", merges)
    w.add("tokenizer.ggml.bos_token_id", eot_id)
    w.add("tokenizer.ggml.eos_token_id", eot_id)
    w.add("tokenizer.ggml.padding_token_id", eot_id)
    w.add("tokenizer.ggml.add_bos_token", False)
    w.add("tokenizer.chat_template", CHAT_TEMPLATE)
    sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
    Q = gw.Q8_0
    w.add_tensor("token_embd.weight", sd["transformer.wte.weight"], Q)
    w.add_tensor("position_embd.weight", sd["transformer.wpe.weight"], gw.F32)
    for i in range(cfg.n_layer):
        h, b = "transformer.h.%d." % i, "blk.%d." % i
        w.add_tensor(b + "attn_norm.weight", sd[h + "ln_1.weight"], gw.F32)
        w.add_tensor(b + "attn_norm.bias", sd[h + "ln_1.bias"], gw.F32)
        w.add_tensor(b + "attn_qkv.weight", sd[h + "attn.c_attn.weight"].T, Q)  # Conv1D [in,out] -> [out,in]
        w.add_tensor(b + "attn_qkv.bias", sd[h + "attn.c_attn.bias"], gw.F32)
        w.add_tensor(b + "attn_output.weight", sd[h + "attn.c_proj.weight"].T, Q)
        w.add_tensor(b + "attn_output.bias", sd[h + "attn.c_proj.bias"], gw.F32)
        w.add_tensor(b + "ffn_norm.weight", sd[h + "ln_2.weight"], gw.F32)
        w.add_tensor(b + "ffn_norm.bias", sd[h + "ln_2.bias"], gw.F32)
        w.add_tensor(b + "ffn_up.weight", sd[h + "mlp.c_fc.weight"].T, Q)
        w.add_tensor(b + "ffn_up.bias", sd[h + "mlp.c_fc.bias"], gw.F32)
        w.add_tensor(b + "ffn_down.weight", sd[h + "mlp.c_proj.weight"].T, Q)
        w.add_tensor(b + "ffn_down.bias", sd[h + "mlp.c_proj.bias"], gw.F32)
    w.add_tensor("output_norm.weight", sd["transformer.ln_f.weight"], gw.F32)
    w.add_tensor("output_norm.bias", sd["transformer.ln_f.bias"], gw.F32)
    w.add_tensor("output.weight", sd.get("lm_head.weight", sd["transformer.wte.weight"]), Q)  # tied in training; written out for loaders
    w.write(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("data")
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--time-limit", type=float, default=200.0, help="seconds of training at most")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    lf = open(os.path.join(a.out, "train_log.txt"), "w")
    torch.manual_seed(1234)
    np.random.seed(1234)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    log(lf, "torch", torch.__version__, "transformers", transformers.__version__, "device", dev,
        torch.cuda.get_device_name(0) if dev == "cuda" else "")

    train_text = open(os.path.join(a.data, "train.txt"), encoding="utf-8").read()
    val_text = open(os.path.join(a.data, "val.txt"), encoding="utf-8").read()
    t0 = time.time()
    tok = train_tokenizer(train_text, a.vocab)
    eot_id = tok.token_to_id(EOT)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    tr = encode(tok, train_text, eot_id)
    va = encode(tok, val_text, eot_id)
    log(lf, "tokenizer: vocab %d, eot %d, %.1fs; train %d tokens (%.2f chars/token), val %d tokens" % (
        tok.get_vocab_size(), eot_id, time.time() - t0, len(tr), len(train_text) / len(tr), len(va)))
    cases = ["Hello, world!", "It is a truth universally acknowledged, that a single man",
             "User: How do you do?\nAssistant:", "  spaces\tand\nnewlines  ", "Numbers 12345 and 3.14, émigré, naïve — “quotes”",
             "I'm sure you'll say it's 'fine'", "<|endoftext|>"]
    with open(os.path.join(a.out, "tokenizer_cases.json"), "w") as f:
        json.dump([{"text": c, "ids": tok.encode(c).ids} for c in cases], f, ensure_ascii=False, indent=1)

    cfg = transformers.GPT2Config(vocab_size=tok.get_vocab_size(), n_positions=a.ctx, n_embd=256, n_layer=6,
                                  n_head=8, n_inner=1024, activation_function="gelu_new", resid_pdrop=0.2,
                                  embd_pdrop=0.2, attn_pdrop=0.2, layer_norm_epsilon=1e-5,
                                  bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True)
    model = transformers.GPT2LMHeadModel(cfg).to(dev)
    nparam = sum(p.numel() for p in model.parameters())
    log(lf, "model: %d parameters (tied embeddings)" % nparam)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    nodecay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), fused=(dev == "cuda"))
    trd = torch.from_numpy(tr).to(dev)
    vad = torch.from_numpy(va).to(dev)
    warm = 100

    def lr_at(s):
        if s < warm:
            return a.lr * (s + 1) / warm
        p = min(1.0, (s - warm) / max(1, a.steps - warm))
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    def batch(data, bs):
        ix = torch.randint(0, len(data) - a.ctx - 1, (bs,), device=dev)
        off = torch.arange(a.ctx + 1, device=dev)
        x = data[ix[:, None] + off[None, :]]
        return x[:, :-1], x[:, 1:]

    @torch.no_grad()
    def evaluate(data, n=40):
        model.eval()
        g = torch.Generator(device=dev).manual_seed(7)
        tot = 0.0
        for _ in range(n):
            ix = torch.randint(0, len(data) - a.ctx - 1, (16,), device=dev, generator=g)
            off = torch.arange(a.ctx + 1, device=dev)
            x = data[ix[:, None] + off[None, :]]
            with torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda")):
                out = model(input_ids=x[:, :-1])
            tot += torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, cfg.vocab_size),
                                                     x[:, 1:].reshape(-1)).item()
        model.train()
        return tot / n

    best = (float("inf"), None, -1)
    model.train()
    t0 = time.time()
    step = 0
    hist = []
    for step in range(a.steps):
        for gparam in opt.param_groups:
            gparam["lr"] = lr_at(step)
        x, y = batch(trd, a.batch)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=(dev == "cuda")):
            out = model(input_ids=x)
        loss = torch.nn.functional.cross_entropy(out.logits.float().reshape(-1, cfg.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        last = step + 1 == a.steps or time.time() - t0 > a.time_limit
        if (step + 1) % 250 == 0 or last:
            trl, val = evaluate(trd), evaluate(vad)
            hist.append((step + 1, trl, val))
            log(lf, "step %5d  lr %.2e  train %.4f  val %.4f  (%.0fs)" % (step + 1, lr_at(step), trl, val, time.time() - t0))
            if val < best[0]:
                best = (val, {k: v.detach().clone() for k, v in model.state_dict().items()}, step + 1)
        if last:
            break
    model.load_state_dict(best[1])
    model.eval()
    log(lf, "best checkpoint: step %d, val loss %.4f (ppl %.1f); trained %d steps x %d x %d tokens in %.0fs" % (
        best[2], best[0], math.exp(best[0]), step + 1, a.batch, a.ctx, time.time() - t0))

    gpath = os.path.join(a.out, "default.gguf")
    export_gguf(gpath, model, tok, cfg, eot_id)
    log(lf, "exported %s: %.2f MB" % (gpath, os.path.getsize(gpath) / 1e6))

    # Read back with the independent reader and compare with the trained model.
    import ref  # plugins/testdata/reference/ref.py
    from gguf_reader import GGUFFile
    g = GGUFFile(gpath)
    qmodel, info = ref.load_gpt2(g)
    fmodel = model.float().cpu().eval()
    ids = encode(tok, val_text[:3000], eot_id)[: a.ctx].tolist()
    with torch.no_grad():
        lf32 = fmodel(input_ids=torch.tensor([ids])).logits[0]
        lq = qmodel(input_ids=torch.tensor([ids])).logits[0]
    rel = (torch.linalg.norm(lq - lf32) / torch.linalg.norm(lf32)).item()
    tgt = torch.tensor(ids[1:])
    ce_f = torch.nn.functional.cross_entropy(lf32[:-1], tgt).item()
    ce_q = torch.nn.functional.cross_entropy(lq[:-1], tgt).item()
    log(lf, "GGUF (Q8_0) vs trained float32 on %d val tokens: logits rel err %.4f, loss %.4f -> %.4f" % (len(ids), rel, ce_f, ce_q))

    torch.manual_seed(42)
    prompts = ["It is a truth universally acknowledged", "Elizabeth could not help",
               "User: What do you think of Mr. Darcy?\nAssistant:", "User: Good morning! How are you today?\nAssistant:"]
    with open(os.path.join(a.out, "samples.txt"), "w") as sf:
        for p in prompts:
            pid = tok.encode(p).ids
            for mode in ("greedy", "sampled (T=0.8, top-k 40)"):
                with torch.no_grad():
                    gen = qmodel.generate(torch.tensor([pid]), max_new_tokens=80, do_sample=(mode != "greedy"),
                                          temperature=0.8, top_k=40, eos_token_id=eot_id, pad_token_id=eot_id)
                text = tok.decode(gen[0, len(pid):].tolist())
                s = "### %s | %s\n%s%s\n\n" % (mode, p.replace("\n", "\\n"), p, text)
                sf.write(s)
                print(s, flush=True)
    meta = dict(name=NAME, params=nparam, vocab=cfg.vocab_size, best_step=best[2], best_val=best[0],
                history=hist, train_tokens=int(len(tr)), val_tokens=int(len(va)), gguf_bytes=os.path.getsize(gpath),
                q8_rel_err=rel, val_loss_f32=ce_f, val_loss_q8=ce_q, steps=step + 1, batch=a.batch, ctx=a.ctx, lr=a.lr)
    with open(os.path.join(a.out, "train_meta.json"), "w") as f:
        json.dump(meta, f, indent=1)


if __name__ == "__main__":
    main()

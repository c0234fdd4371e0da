package nn

import "fmt"

// Dims are the transformer dimensions the architectures read the same way
// from a GGUF file.
type Dims struct {
	Layers, Width  int
	Heads, KVHeads int
	HeadDim, Vocab int
}

// ReadDims reads {arch}.block_count, .embedding_length, .attention.head_count
// and .attention.head_count_kv (which defaults to head_count when kvOptional),
// the vocabulary from token_embd.weight ([width, vocab]) and the head size
// from .attention.key_length (default: the rows of blk.0.attn_q.weight over
// the heads); .attention.value_length must equal it. Errors name the key or
// the tensor. Model builders and their memory footprints share it, so a plan
// and a load read the same numbers.
func ReadDims(hp Hparams, w *Weights, kvOptional bool) (Dims, error) {
	var d Dims
	var err error
	if d.Layers, err = hp.Int("block_count"); err != nil {
		return d, err
	}
	if d.Width, err = hp.Int("embedding_length"); err != nil {
		return d, err
	}
	if d.Heads, err = hp.Int("attention.head_count"); err != nil {
		return d, err
	}
	if kvOptional {
		d.KVHeads, err = hp.IntOr("attention.head_count_kv", d.Heads)
	} else {
		d.KVHeads, err = hp.Int("attention.head_count_kv")
	}
	if err != nil {
		return d, err
	}
	if d.Heads <= 0 || d.KVHeads <= 0 || d.Heads%d.KVHeads != 0 {
		return d, fmt.Errorf("metadata key %s.attention.head_count_kv = %d: must divide head_count %d", hp.Arch, d.KVHeads, d.Heads)
	}
	es, err := w.Shape("token_embd.weight")
	if err != nil {
		return d, err
	}
	if len(es) != 2 || es[0] != d.Width {
		return d, fmt.Errorf("tensor token_embd.weight has shape %v, want [%d, vocab]", es, d.Width)
	}
	d.Vocab = es[1]
	qs, err := w.Shape("blk.0.attn_q.weight")
	if err != nil {
		return d, err
	}
	if len(qs) != 2 || qs[1]%d.Heads != 0 {
		return d, fmt.Errorf("tensor blk.0.attn_q.weight has shape %v: rows not a multiple of %d heads", qs, d.Heads)
	}
	if d.HeadDim, err = hp.IntOr("attention.key_length", qs[1]/d.Heads); err != nil {
		return d, err
	}
	if vl, err := hp.IntOr("attention.value_length", d.HeadDim); err != nil || vl != d.HeadDim {
		return d, fmt.Errorf("metadata key %s.attention.value_length = %d, must equal key_length %d (%v)", hp.Arch, vl, d.HeadDim, err)
	}
	return d, nil
}

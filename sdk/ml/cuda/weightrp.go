package cuda

// Weights repacked at load time for the one-token GEMVs (session 12,
// issue 7; cuda/src/weight_rp.cuh says why and how): a three-dimensional
// MXFP4 weight (the experts' gate, up and down) and a Q8_0 matrix are
// allocated with room for a second copy of their rows after the original
// bytes (ORCH_T_MXFP4_DUAL / ORCH_T_Q8_0_DUAL, orch_cuda.h), filled on the
// device by orch_weight_repack when uploaded. The tensor's data stays the
// original bytes at its address, so every op reads it as before; only the
// calls that know the dual types pass them: the MoE decode calls (all three
// expert weights repacked: MoE v10's gate_up / down read 16-byte aligned
// blocks with the scales apart) and the dense GEMV calls (GEMV v5 reads
// 32-byte aligned quants with the scales apart; every other path of those
// entries the original rows).
//
// Memory: a copy costs the weight's size again (gpt-oss-20b: ~12 GB,
// Llama-3-8B: ~8 GB). It is made only while, after it, at least half of the
// device's memory stays free (the rest of the model, the KV cache and the
// bf16 cache come later); a weight that does not fit keeps one copy and the
// plain kernels. ORCH_CUDA_WEIGHT_RP=0 turns the copies off, =mxfp4 / =q8_0
// makes only that type's (A/B; read once).

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// The dual type codes (orch_cuda.h).
const (
	tMXFP4Dual = 139
	tQ80Dual   = 108
)

// rpRowBytes and rpOffset mirror quant.cuh's rp_row_bytes / rp_offset: the bytes of a repacked row of k elements (the
// blocks' 16 / 32 quant bytes, then the 1- / 2-byte scales padded to 16), and where the repacked rows of a rows x k
// tensor start (its original rows' size rounded up to 256).
func rpRowBytes(dt ml.DType, k int64) int64 {
	nch, sb := k/32, int64(1)
	if dt == ml.Q8_0 {
		sb = 2
	}
	return 16*sb*nch + (sb*nch+15)&^15
}

func rpOffset(dt ml.DType, rows, k int64) int64 {
	rb, _ := dt.RowBytes(int(k))
	return (rows*int64(rb) + 255) &^ 255
}

var weightRPEnv = os.Getenv("ORCH_CUDA_WEIGHT_RP")

// rpType: whether ORCH_CUDA_WEIGHT_RP lets weights of type dt be repacked.
func rpType(dt ml.DType) bool {
	switch weightRPEnv {
	case "0":
		return false
	case "mxfp4":
		return dt == ml.MXFP4
	case "q8_0":
		return dt == ml.Q8_0
	}
	return true
}

// rpShape: whether a weight of type dt and shape (dims checked > 0 by tensorBytes) gets the repacked copy (MXFP4 with
// three dimensions: experts; Q8_0 with two: matrices), its rows and row length, and the bytes of the whole allocation.
func (b *Backend) rpShape(dt ml.DType, shape []int) (rows, k, total int64, ok bool) {
	if !rpType(dt) || b.l.weightRepack == nil || !(dt == ml.MXFP4 && len(shape) == 3 || dt == ml.Q8_0 && len(shape) == 2) {
		return 0, 0, 0, false
	}
	k, rows = int64(shape[0]), 1
	for _, d := range shape[1:] {
		rows *= int64(d)
	}
	return rows, k, rpOffset(dt, rows, k) + rows*rpRowBytes(dt, k), true
}

// rpFits: whether total - nb more bytes leave at least half of the device's memory free.
func (b *Backend) rpFits(total int64, nb int) bool {
	free, all := b.MemoryInfo()
	return all > 0 && free-(total-int64(nb)) >= all/2
}

// moeWTypes: the gu_type and down_type a MoE decode call passes for these weights.
func moeWTypes(gate, up, down *tensor) (gu, dn int32) {
	if gate.rp && up.rp && down.rp {
		return tMXFP4Dual, tMXFP4Dual
	}
	return int32(gate.dt), int32(down.dt)
}

// gemvWType: the weight type a dense GEMV call (orch_matmul, _multi, _swiglu, _addnorm, _multi_nf, _swiglu_nf,
// orch_moe_decode_oproj's projection) passes for w.
func gemvWType(w *tensor) int32 {
	if w.rp && w.dt == ml.Q8_0 {
		return tQ80Dual
	}
	return int32(w.dt)
}

// plainWType: the GGUF type of a weight type code (a dual code: its base type).
func plainWType(t int32) ml.DType {
	switch t {
	case tQ80Dual:
		return ml.Q8_0
	case tMXFP4Dual:
		return ml.MXFP4
	}
	return ml.DType(t)
}

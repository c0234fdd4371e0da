package cuda

// MXFP4 expert weights repacked for the one-token MoE kernels (session 12,
// issue 7; cuda/src/mxfp4_rp.cuh says why and how). A three-dimensional
// MXFP4 weight (the experts' gate, up and down) is allocated with room for a
// second copy of its rows after the original bytes (ORCH_T_MXFP4_DUAL,
// orch_cuda.h), filled on the device by orch_mxfp4_repack when it is
// uploaded. The tensor's data stays the original bytes at its address, so
// every op reads it as before; only the MoE decode calls pass the dual type,
// and only when gate, up and down all carry the copy, so that MoE v10's
// gate_up / down kernels read 16-byte aligned blocks with the scales apart.
//
// Memory: the copy costs the experts' size again (gpt-oss-20b: ~11 GB). It
// is made only while, after it, at least half of the device's memory stays
// free (the rest of the model, the KV cache and the bf16 cache come later);
// a weight that does not fit keeps one copy and the plain kernels.
// ORCH_CUDA_MXFP4_RP=0 turns the copies off (A/B).

import (
	"os"

	"github.com/llama-orch/orch/sdk/ml"
)

// tMXFP4Dual is ORCH_T_MXFP4_DUAL.
const tMXFP4Dual = 139

// mxfp4RPRowBytes and mxfp4RPOffset mirror mxfp4_rp.cuh: the bytes of a repacked row of k elements, and where the
// repacked rows of a rows x k tensor start.
func mxfp4RPRowBytes(k int64) int64     { nch := k / 32; return nch*16 + (nch+15)&^15 }
func mxfp4RPOffset(rows, k int64) int64 { return (rows*(k/32)*17 + 255) &^ 255 }

var mxfp4RPOff = os.Getenv("ORCH_CUDA_MXFP4_RP") == "0"

// rpShape: whether a weight of type dt and shape gets the repacked copy (MXFP4, three dimensions: experts), its rows
// and row length, and the bytes of the whole allocation.
func (b *Backend) rpShape(dt ml.DType, shape []int) (rows, k, total int64, ok bool) {
	if mxfp4RPOff || b.l.mxfp4Repack == nil || dt != ml.MXFP4 || len(shape) != 3 || shape[0]%32 != 0 {
		return 0, 0, 0, false
	}
	k, rows = int64(shape[0]), int64(shape[1])*int64(shape[2])
	if k <= 0 || rows <= 0 {
		return 0, 0, 0, false
	}
	return rows, k, mxfp4RPOffset(rows, k) + rows*mxfp4RPRowBytes(k), true
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

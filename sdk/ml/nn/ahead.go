package nn

import (
	"context"
	"math/bits"
	"slices"

	"github.com/llama-orch/orch/sdk/ml"
)

// Steps launched ahead (session 11). Between two decode steps the device
// idles while the host reads the step's tokens, the engine hands them out
// and schedules, and the runner stages and launches the next step: ~90 µs of
// a ~1.75 ms gpt-oss step on an H100 (ORCH_CUDA_GAPTIME). In steady decode
// the next step is predictable: the same sequences, one position on, fed the
// tokens this step draws. So after queuing a captured decode step the runner
// queues a read of its tokens (ml.AheadBackend), queues the predicted next
// step's inputs on the device (its tokens from this step's, positions and
// KV slots + 1), launches it, and only then waits for this step's tokens.
// When the engine's next batch is the prediction (takeAhead), that step is
// already running: the runner queues the one after it and reads. Measured
// (H100, session 11): the gap ~80-100 -> ~25 µs a step, gpt-oss tg128 +3%,
// Llama +1.7%.
//
// A miss costs the predicted step's device time (its KV writes at the next
// position are rewritten by whichever step really writes there, before any
// read: stream order), so it is only tried where a miss is rare and the gap
// matters: one-piece graph decode steps of at most aheadMaxSeqs sequences,
// greedy or drawn on the device (no Host rows), no tensor parallelism, and
// never when the next position needs a block the table may not have yet
// (the first position of a block).

// aheadMaxSeqs bounds the sequences of a step launched ahead: with more, the
// gap is a small part of the step and sequences finish or join more often.
const aheadMaxSeqs = 4

// The miss throttle (aheadOutcome).
const (
	aheadWindow     = 16
	aheadMaxMisses  = 8
	aheadPauseSteps = 64
)

// ahead is a decode step launched before the engine asked for it.
type ahead struct {
	p    *Piece // as staged (padded tables); Tokens: the step's input tokens (set once the step before is read)
	pk   pick   // greedy or sample (specs: the predicted ones, Index + 1)
	read ml.PendingI32
}

// canAhead reports whether the step of p just queued (a one-piece graph
// decode step with pk) may be followed by one launched ahead.
func (r *Runner) canAhead(p *Piece, pk *pick) bool {
	if r.ab == nil || p.NSeq > aheadMaxSeqs || !(pk.greedy || pk.sample) {
		return false
	}
	if r.aheadPause > 0 {
		r.aheadPause--
		return false
	}
	if pk.sample {
		for _, j := range p.OutOwner {
			if pk.specs[j].Host {
				return false
			}
		}
	}
	bs := int32(r.KV.BlockSize)
	for _, pos := range p.Pos {
		if (pos+1)%bs == 0 || int(pos)+2 > r.cfg.Spec.ContextLength {
			return false
		}
	}
	return true
}

// readTokens reads the m tokens of the step just queued into dst. When the
// step is a one-piece graph decode step (oneGraph) that can be predicted,
// it first launches the next step (launchAhead) and keeps it in r.next.
func (r *Runner) readTokens(p *Piece, m int, oneGraph bool, pk *pick, dst []int32) error {
	if !oneGraph || !r.canAhead(p, pk) {
		return r.B.ReadI32(r.view(r.argmax, m), dst)
	}
	rd, err := r.ab.ReadI32Async(r.view(r.argmax, m))
	if err != nil {
		return err
	}
	return r.aheadThenWait(p, pk, rd, dst)
}

// aheadThenWait launches the step after p's (queued, its tokens read by rd),
// then waits for rd into dst.
func (r *Runner) aheadThenWait(p *Piece, pk *pick, rd ml.PendingI32, dst []int32) error {
	nx, err := r.launchAhead(p, pk)
	if err != nil {
		rd.Drop()
		return err
	}
	if err := rd.Wait(dst); err != nil {
		r.dropAhead(nx)
		return err
	}
	nx.p.Tokens = slices.Clone(dst)
	r.next = nx
	return nil
}

// advance is the piece of the decode step after p's: each sequence one
// position on (within the same block: canAhead), tokens unset.
func (p *Piece) advance() *Piece {
	inc := func(v []int32) []int32 {
		o := make([]int32, len(v))
		for i, x := range v {
			o[i] = x + 1
		}
		return o
	}
	q := &Piece{Tokens: make([]int32, len(p.Tokens)), Pos: inc(p.Pos), Seq: p.Seq, Slots: inc(p.Slots), Blocks: p.Blocks,
		MaxBlocks: p.MaxBlocks, NSeq: p.NSeq, OutRows: p.OutRows, OutOwner: p.OutOwner, GroupBlocks: p.GroupBlocks}
	for _, gs := range p.GroupSlots {
		q.GroupSlots = append(q.GroupSlots, inc(gs))
	}
	return q
}

// launchAhead stages and launches the decode step after p's (queued just
// before), and queues a read of its tokens after it. Its inputs are written
// on the device (ml.AheadBackend.AdvanceStep: tokens from p's, positions and
// slots + 1, draw counters + 1) and the host images updated to match, so
// stage uploads nothing; without the images it uploads the changed span and
// copies the tokens on the device.
func (r *Runner) launchAhead(p *Piece, pk *pick) (*ahead, error) {
	q := p.advance()
	n, m := len(q.Tokens), r.cfg.MaxTokens
	a := &ahead{p: q, pk: pick{greedy: pk.greedy, sample: pk.sample, filters: pk.filters}}
	var params ml.Tensor
	if pk.sample {
		a.pk.specs = slices.Clone(pk.specs)
		for i, sp := range a.pk.specs {
			if sp.Temperature >= ml.SampleMinTemperature { // a draw: the next token's index (a greedy row's spec stays)
				a.pk.specs[i].Index++
			}
		}
		params = r.view(r.params, ml.SampleParamsWords*n)
	}
	img, pimg := r.staged[r.inputs], r.staged[r.params]
	inc := uint32(1<<1 | 1<<3) // positions, slots; then each further KV group's slots
	for g := range r.gslots {
		inc |= 1 << (5 + g)
	}
	advanced := len(img) == r.inputs.Len() && (!pk.sample || len(pimg) >= ml.SampleParamsWords*n) &&
		r.ab.AdvanceStep(r.inputs, m, inc, r.view(r.argmax, n), params, n)
	if advanced {
		for i := range n {
			img[i] = -1 // the device's tokens: unknown here, so the next upload writes them
			for s := 1; s < 32; s++ {
				if inc>>s&1 != 0 {
					img[s*m+i]++
				}
			}
		}
		if pk.sample { // the device now holds the predicted settings (each drawing row's counter + 1)
			w, _ := r.packParams(q, 0, n, a.pk.specs)
			copy(pimg, w)
		}
	}
	// the tokens as the host image holds them: stage uploads none of them
	copy(q.Tokens, r.staged[r.inputs])
	st, err := r.stage(q)
	if err != nil {
		return nil, err
	}
	if !advanced { // the positions were uploaded: the tokens are copied here
		r.B.Copy(r.view(r.tokens, n), r.view(r.argmax, n))
		if img := r.staged[r.inputs]; len(img) >= n {
			for i := range n {
				img[i] = -1
			}
		}
	}
	if pk.sample {
		f, err := r.stageParams(q, 0, n, a.pk.specs)
		if err != nil {
			return nil, err
		}
		a.pk.filters = max(f, pk.filters) // the same: only the draw counter moved
	}
	if err := r.launch(st, n, true, &a.pk); err != nil {
		return nil, err
	}
	if a.read, err = r.ab.ReadI32Async(r.view(r.argmax, n)); err != nil {
		return nil, err
	}
	r.aheadLaunched.Add(1)
	return a, nil
}

// aheadOutcome records whether a step launched ahead was used; after more
// than aheadMaxMisses misses among aheadWindow outcomes no step is launched
// ahead for the next aheadPauseSteps candidates (every miss costs a step of
// device time: batches that change every few steps gain nothing from it).
func (r *Runner) aheadOutcome(hit bool) {
	r.aheadHist <<= 1
	if !hit {
		r.aheadHist |= 1
	}
	r.aheadSeen++
	if r.aheadSeen >= aheadWindow && bits.OnesCount32(r.aheadHist&(1<<aheadWindow-1)) > aheadMaxMisses {
		r.aheadPause, r.aheadHist, r.aheadSeen = aheadPauseSteps, 0, 0
	}
}

// AheadStats reports how many decode steps were launched ahead so far and
// how many of them the engine then asked for.
func (r *Runner) AheadStats() (launched, hits int64) {
	return r.aheadLaunched.Load(), r.aheadHits.Load()
}

// dropAhead gives up a step launched ahead (it runs to its end unread).
func (r *Runner) dropAhead(a *ahead) {
	if a != nil && a.read != nil {
		a.read.Drop()
	}
}

// takeAhead answers a call from the step launched ahead when the batch is
// its prediction (hit: the tokens are appended to toks, after the next step
// is launched ahead in turn); otherwise the step is dropped and the call
// runs as usual.
func (r *Runner) takeAhead(ctx context.Context, pieces []Piece, pk *pick, toks *[]int32) (bool, error) {
	a := r.next
	r.next = nil
	hit := len(pieces) == 1 && r.matches(a, &pieces[0], pk)
	r.aheadOutcome(hit)
	if !hit {
		r.dropAhead(a)
		return false, nil
	}
	if err := ctx.Err(); err != nil {
		r.dropAhead(a)
		return true, err
	}
	r.aheadHits.Add(1)
	n := len(a.p.Tokens)
	k := len(*toks)
	*toks = slices.Grow(*toks, n)[:k+n]
	dst := (*toks)[k:]
	if !r.canAhead(a.p, pk) {
		return true, a.read.Wait(dst)
	}
	return true, r.aheadThenWait(a.p, &a.pk, a.read, dst)
}

// matches reports whether the engine's piece p (pick pk) is the step a
// predicted. Block table entries that no token of p can see (below a window
// group's window, freed by the engine: -1, staged as 0) may differ.
func (r *Runner) matches(a *ahead, p *Piece, pk *pick) bool {
	if pk.greedy != a.pk.greedy || pk.sample != a.pk.sample || !r.decodeStep(p) {
		return false
	}
	if pk.sample && !slices.Equal(pk.specs, a.pk.specs) {
		return false
	}
	p.padTables(r.tableBlocks)
	q := a.p
	if p.NSeq != q.NSeq || p.MaxBlocks != q.MaxBlocks || !slices.Equal(p.Tokens, q.Tokens) ||
		!slices.Equal(p.Pos, q.Pos) || !slices.Equal(p.Seq, q.Seq) || !slices.Equal(p.Slots, q.Slots) ||
		!slices.Equal(p.OutRows, q.OutRows) || !slices.Equal(p.OutOwner, q.OutOwner) ||
		len(p.GroupSlots) != len(q.GroupSlots) || len(p.GroupBlocks) != len(q.GroupBlocks) {
		return false
	}
	for g := range p.GroupSlots {
		if !slices.Equal(p.GroupSlots[g], q.GroupSlots[g]) {
			return false
		}
	}
	bs := int32(r.KV.BlockSize)
	pt, qt := append([][]int32{p.Blocks}, p.GroupBlocks...), append([][]int32{q.Blocks}, q.GroupBlocks...)
	for g, kg := range r.groups {
		for s := range p.NSeq {
			// sequence s's one token: table entries below its window's first block are never read
			lo := 0
			if kg.Window > 0 {
				lo = int(max(0, p.Pos[s]-int32(kg.Window)+1) / bs)
			}
			row := s * p.MaxBlocks
			if !slices.Equal(pt[g][row+lo:row+p.MaxBlocks], qt[g][row+lo:row+p.MaxBlocks]) {
				return false
			}
		}
	}
	return true
}

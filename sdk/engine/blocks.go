package engine

import (
	"container/list"
	"slices"
)

// blockPool is the paged KV block allocator and the prefix cache over the
// model's shared pool of Spec().NumBlocks blocks. It is owned by the
// scheduler goroutine and is not safe for concurrent use.
//
// A block is in exactly one of three states:
//   - in use: ref > 0 (held by one or more sequences' block tables);
//   - cached: ref == 0 but registered in the prefix index; it sits in the LRU
//     list and is evicted (unregistered) when a fresh block is needed;
//   - free: ref == 0 and not registered.
//
// Only full blocks are registered. A block's key is a hash chain: the hash of
// its parent block's key and its own tokens, so a key identifies the whole
// prefix up to the block's end. Keys are verified against the stored parent
// key and tokens on lookup, so a hash collision can never share wrong KV.
//
// Hand-written rather than a library: the allocator, the ref counts and the
// LRU must change together in one step of the scheduler, and there is no
// dependency-free Go package for a paged-attention block manager.
type blockPool struct {
	size  int // tokens per block
	meta  []blockMeta
	free  []int32    // free blocks (stack)
	lru   *list.List // cached blocks with ref == 0, least recently used at the front
	index map[uint64]int32
	used  int // blocks with ref > 0

	queries, hits int64
}

type blockMeta struct {
	ref    int
	cached bool
	key    uint64
	parent uint64
	tokens []int32
	elem   *list.Element // position in lru while cached with ref == 0
}

// rootKey is the parent key of a sequence's first block.
const rootKey uint64 = 0x9e3779b97f4a7c15

func newBlockPool(numBlocks, blockSize int) *blockPool {
	p := &blockPool{
		size:  blockSize,
		meta:  make([]blockMeta, numBlocks),
		free:  make([]int32, 0, numBlocks),
		lru:   list.New(),
		index: make(map[uint64]int32),
	}
	for b := numBlocks - 1; b >= 0; b-- {
		p.free = append(p.free, int32(b))
	}
	return p
}

// total is the number of blocks in the pool.
func (p *blockPool) total() int { return len(p.meta) }

// available is how many blocks alloc can still hand out (free plus evictable cached).
func (p *blockPool) available() int { return len(p.free) + p.lru.Len() }

// alloc hands out a block with ref 1, evicting the least recently used cached
// block when no free block is left. ok is false when every block is in use.
func (p *blockPool) alloc() (int32, bool) {
	var b int32
	switch {
	case len(p.free) > 0:
		b = p.free[len(p.free)-1]
		p.free = p.free[:len(p.free)-1]
	case p.lru.Len() > 0:
		b = p.lru.Remove(p.lru.Front()).(int32)
		m := &p.meta[b]
		m.elem = nil
		delete(p.index, m.key)
		m.cached, m.tokens = false, nil
	default:
		return 0, false
	}
	p.meta[b].ref = 1
	p.used++
	return b, true
}

// retain adds a reference to b (a cached block found by lookup or a shared one).
func (p *blockPool) retain(b int32) {
	m := &p.meta[b]
	if m.ref == 0 {
		if m.elem != nil {
			p.lru.Remove(m.elem)
			m.elem = nil
		}
		p.used++
	}
	m.ref++
}

// release drops a reference to b; a block nobody holds becomes cached (most
// recently used) if registered, else free.
func (p *blockPool) release(b int32) {
	m := &p.meta[b]
	if m.ref <= 0 {
		return // double release: a scheduler bug; never corrupt the free list
	}
	m.ref--
	if m.ref > 0 {
		return
	}
	p.used--
	if m.cached {
		m.elem = p.lru.PushBack(b)
		return
	}
	p.free = append(p.free, b)
}

// shared reports whether writing into b could change KV that someone else
// reads now or later: it is held by another sequence or registered in the
// prefix cache.
func (p *blockPool) shared(b int32) bool { m := &p.meta[b]; return m.ref > 1 || m.cached }

// chainKey is the key of a full block with the given parent key and tokens.
func chainKey(parent uint64, tokens []int32) uint64 {
	h := parent ^ 0xcbf29ce484222325
	for _, t := range tokens {
		h ^= uint64(uint32(t))
		h *= 0x100000001b3
		h ^= h >> 29
	}
	return mix64(h)
}

func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// register records full block b (holding tokens, after parent) in the prefix
// index and returns its key. When an identical block is already registered
// (another sequence computed the same prefix), b stays private.
func (p *blockPool) register(b int32, parent uint64, tokens []int32) uint64 {
	key := chainKey(parent, tokens)
	if _, ok := p.index[key]; ok {
		return key
	}
	m := &p.meta[b]
	if m.cached {
		return m.key
	}
	m.cached, m.key, m.parent, m.tokens = true, key, parent, slices.Clone(tokens)
	p.index[key] = b
	return key
}

// lookup returns the cached blocks holding the longest prefix of tokens made
// of full blocks (at most maxBlocks) and their keys. The blocks are not
// retained; the caller does that.
func (p *blockPool) lookup(tokens []int32, maxBlocks int) (blocks []int32, keys []uint64) {
	parent := rootKey
	for i := 0; i < maxBlocks && (i+1)*p.size <= len(tokens); i++ {
		seg := tokens[i*p.size : (i+1)*p.size]
		key := chainKey(parent, seg)
		b, ok := p.index[key]
		if !ok {
			break
		}
		m := &p.meta[b]
		if m.parent != parent || !slices.Equal(m.tokens, seg) {
			break
		}
		blocks = append(blocks, b)
		keys = append(keys, key)
		parent = key
	}
	return blocks, keys
}

// find returns the cached block registered under key when it holds tokens
// after parent (the same verification as lookup).
func (p *blockPool) find(key, parent uint64, tokens []int32) (int32, bool) {
	b, ok := p.index[key]
	if !ok {
		return 0, false
	}
	m := &p.meta[b]
	if m.parent != parent || !slices.Equal(m.tokens, tokens) {
		return 0, false
	}
	return b, true
}

// unpinned counts the blocks among bs that are cached with ref 0 (they count
// in available() but stop being allocatable once retained).
func (p *blockPool) unpinned(bs []int32) int {
	n := 0
	for _, b := range bs {
		if b >= 0 && p.meta[b].ref == 0 {
			n++
		}
	}
	return n
}

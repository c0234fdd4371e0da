package synth

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"

	"github.com/llama-orch/orch/sdk/gguf"
)

// tensorSeed mixes the user seed with the tensor name, so every tensor has
// its own stream and adding a tensor never shifts the others.
func tensorSeed(seed uint64, name string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(name))
	return splitmix(seed ^ h.Sum64())
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

const chunkTarget = 1 << 20 // bytes per generation chunk

// generate streams tensor s's bytes to out. Chunk i of a tensor is drawn
// from PCG(seed, i), so the bytes do not depend on the number of workers.
func generate(out io.Writer, s TensorSpec, seed uint64, c Config, workers int) error {
	if s.Init == InitRopeFreqs {
		if s.Type != gguf.TypeF32 {
			return fmt.Errorf("synth: %s must be F32", s.Name)
		}
		fr := llama3RopeFreqs(c.HeadDim, float64(c.RopeBase))
		buf := make([]byte, 4*len(fr))
		for i, v := range fr {
			binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
		}
		_, err := out.Write(buf)
		return err
	}
	bb := int64(s.Type.BlockBytes())
	if bb == 0 {
		return fmt.Errorf("synth: %s: unknown type %s", s.Name, s.Type)
	}
	switch s.Type {
	case gguf.TypeF32, gguf.TypeF16, gguf.TypeBF16, gguf.TypeQ8_0, gguf.TypeQ4_0, gguf.TypeMXFP4:
	default:
		return fmt.Errorf("synth: %s: cannot generate %s weights (supported: F32, F16, BF16, Q8_0, Q4_0, MXFP4)", s.Name, s.Type)
	}
	if s.Init == InitNorm && s.Type != gguf.TypeF32 && s.Type != gguf.TypeF16 && s.Type != gguf.TypeBF16 {
		return fmt.Errorf("synth: %s: norm weights must be a float type, not %s", s.Name, s.Type)
	}
	total := s.Bytes()
	blocks := total / bb
	chunkBlocks := max(1, chunkTarget/bb)
	nChunks := (blocks + chunkBlocks - 1) / chunkBlocks
	chunkBytes := func(i int64) int64 { return min(chunkBlocks, blocks-i*chunkBlocks) * bb }
	fill := func(i int64, buf []byte) {
		rng := rand.New(rand.NewPCG(seed, uint64(i)))
		fillChunk(buf, s, rng)
	}
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	if nChunks <= 1 || workers == 1 {
		buf := make([]byte, chunkBlocks*bb)
		for i := int64(0); i < nChunks; i++ {
			b := buf[:chunkBytes(i)]
			fill(i, b)
			if _, err := out.Write(b); err != nil {
				return err
			}
		}
		return nil
	}
	// Ordered parallel pipeline: workers fill chunks, this goroutine writes
	// them in order.
	type job struct {
		idx  int64
		buf  []byte
		done chan struct{}
	}
	pool := sync.Pool{New: func() any { return make([]byte, chunkBlocks*bb) }}
	jobs := make(chan *job, workers)
	queue := make(chan *job, 2*workers)
	stop := make(chan struct{})
	go func() {
		defer close(jobs)
		defer close(queue)
		for i := int64(0); i < nChunks; i++ {
			j := &job{idx: i, done: make(chan struct{})}
			select {
			case queue <- j:
			case <-stop:
				return
			}
			select {
			case jobs <- j:
			case <-stop:
				return
			}
		}
	}()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				j.buf = pool.Get().([]byte)[:chunkBytes(j.idx)]
				fill(j.idx, j.buf)
				close(j.done)
			}
		}()
	}
	var err error
	for j := range queue {
		<-j.done
		if err == nil {
			if _, werr := out.Write(j.buf); werr != nil {
				err = werr
				close(stop)
			}
		}
		pool.Put(j.buf[:cap(j.buf)])
	}
	// drain: jobs sent before stop still complete
	wg.Wait()
	return err
}

var sqrt3 = math.Sqrt(3)

// noMinus128 turns every 0x80 byte (int8 -128) of v into 0x81 (-127), so
// Q8_0 values are symmetric like llama.cpp's quantizer output. A SWAR test
// skips the byte loop for the ~97% of words without such a byte.
func noMinus128(v uint64) uint64 {
	const lo, hi = 0x0101010101010101, 0x8080808080808080
	t := v ^ hi // bytes equal to 0x80 become 0
	if (t-lo)&^t&hi == 0 {
		return v
	}
	for i := 0; i < 64; i += 8 {
		if (v>>i)&0xff == 0x80 {
			v |= 1 << i
		}
	}
	return v
}

func fillChunk(buf []byte, s TensorSpec, rng *rand.Rand) {
	le := binary.LittleEndian
	// float values: two 32-bit uniforms per 64-bit draw
	var spare uint32
	var haveSpare bool
	mean := 0.0
	if s.Init == InitNorm {
		mean = 1
	}
	scale := s.Std * sqrt3 * 2 / (1 << 32)
	val := func() float32 {
		var u uint32
		if haveSpare {
			u, haveSpare = spare, false
		} else {
			x := rng.Uint64()
			u, spare, haveSpare = uint32(x), uint32(x>>32), true
		}
		return float32(mean + (float64(u)+0.5)*scale - s.Std*sqrt3)
	}
	switch s.Type {
	case gguf.TypeF32:
		for i := 0; i+4 <= len(buf); i += 4 {
			le.PutUint32(buf[i:], math.Float32bits(val()))
		}
	case gguf.TypeF16:
		for i := 0; i+2 <= len(buf); i += 2 {
			le.PutUint16(buf[i:], floatToHalf(val()))
		}
	case gguf.TypeBF16:
		for i := 0; i+2 <= len(buf); i += 2 {
			b := math.Float32bits(val())
			b += 0x7fff + (b>>16)&1 // round to nearest even
			le.PutUint16(buf[i:], uint16(b>>16))
		}
	case gguf.TypeQ8_0:
		d := floatToHalf(float32(s.Std * sqrt3 / 127))
		for o := 0; o+34 <= len(buf); o += 34 {
			le.PutUint16(buf[o:], d)
			for k := 0; k < 32; k += 8 {
				le.PutUint64(buf[o+2+k:], noMinus128(rng.Uint64()))
			}
		}
	case gguf.TypeQ4_0:
		d := floatToHalf(float32(s.Std * sqrt3 / 8))
		for o := 0; o+18 <= len(buf); o += 18 {
			le.PutUint16(buf[o:], d)
			le.PutUint64(buf[o+2:], rng.Uint64())
			le.PutUint64(buf[o+10:], rng.Uint64())
		}
	case gguf.TypeMXFP4:
		// uniformly random E2M1 codes have RMS sqrt(68.5/8) ~ 2.93
		e := 127 + int(math.Round(math.Log2(s.Std/2.93)))
		e = max(1, min(254, e))
		for o := 0; o+17 <= len(buf); o += 17 {
			buf[o] = byte(e)
			le.PutUint64(buf[o+1:], rng.Uint64())
			le.PutUint64(buf[o+9:], rng.Uint64())
		}
	}
}

// floatToHalf converts to IEEE binary16 with round-to-nearest-even.
func floatToHalf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int((b >> 23) & 0xff)
	mant := b & 0x7fffff
	switch {
	case exp == 0xff: // inf/nan
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp > 142: // overflow
		return sign | 0x7c00
	case exp < 103: // underflow to zero
		return sign
	case exp < 113: // subnormal half
		mant |= 0x800000
		shift := uint(126 - exp)
		h := mant >> shift
		rem := mant & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	h := uint32(exp-112)<<10 | mant>>13
	rem := mant & 0x1fff
	if rem > 0x1000 || (rem == 0x1000 && h&1 == 1) {
		h++
	}
	return sign | uint16(h)
}

package ml

import "fmt"

// DType is a tensor element type. The numeric values are ggml's type ids, so
// a GGUF tensor type converts with DType(t) (sdk/gguf.Type uses the same ids).
// I32 is ggml's GGML_TYPE_I32 and is used for token ids, positions, block
// tables and argmax results.
type DType uint32

// Element types. Quantized types are only valid for weights (the right-hand
// operand of MatMul, the table of Embed, the experts of MoE).
const (
	F32   DType = 0
	F16   DType = 1
	Q4_0  DType = 2
	Q8_0  DType = 8
	Q4_K  DType = 12
	Q6_K  DType = 14
	I32   DType = 26
	BF16  DType = 30
	MXFP4 DType = 39
)

type dtypeInfo struct {
	name       string
	blockSize  int // elements per block
	blockBytes int // bytes per block
}

var dtypes = map[DType]dtypeInfo{
	F32:   {"F32", 1, 4},
	F16:   {"F16", 1, 2},
	Q4_0:  {"Q4_0", 32, 18},
	Q8_0:  {"Q8_0", 32, 34},
	Q4_K:  {"Q4_K", 256, 144},
	Q6_K:  {"Q6_K", 256, 210},
	I32:   {"I32", 1, 4},
	BF16:  {"BF16", 1, 2},
	MXFP4: {"MXFP4", 32, 17},
}

// Known reports whether d is a type this package understands.
func (d DType) Known() bool { _, ok := dtypes[d]; return ok }

func (d DType) String() string {
	if i, ok := dtypes[d]; ok {
		return i.name
	}
	return fmt.Sprintf("DType(%d)", uint32(d))
}

// BlockSize is the number of elements per quantization block (1 for plain types).
func (d DType) BlockSize() int { return dtypes[d].blockSize }

// BlockBytes is the number of bytes per block.
func (d DType) BlockBytes() int { return dtypes[d].blockBytes }

// Quantized reports whether d is a block-quantized type.
func (d DType) Quantized() bool { return dtypes[d].blockSize > 1 }

// RowBytes returns the bytes that n elements of type d occupy. n must be a
// multiple of the block size.
func (d DType) RowBytes(n int) (int, error) {
	i, ok := dtypes[d]
	if !ok {
		return 0, fmt.Errorf("ml: unknown dtype %d", uint32(d))
	}
	if n < 0 || n%i.blockSize != 0 {
		return 0, fmt.Errorf("ml: %d elements of %s: not a multiple of the block size %d", n, i.name, i.blockSize)
	}
	return n / i.blockSize * i.blockBytes, nil
}

// ParseDType maps a name ("F32", "Q8_0", "MXFP4", ...) to its DType.
func ParseDType(name string) (DType, error) {
	for d, i := range dtypes {
		if i.name == name {
			return d, nil
		}
	}
	return 0, fmt.Errorf("ml: unknown dtype %q", name)
}

// WeightDTypes lists the weight types every backend must read in place.
var WeightDTypes = []DType{F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K, MXFP4}

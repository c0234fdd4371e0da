package nntest

import (
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// npy bytes as numpy.save writes np.arange(6, dtype='<f4').reshape(2, 3)
func npyBytes(shape string, vals []float32) []byte {
	header := "{'descr': '<f4', 'fortran_order': False, 'shape': " + shape + ", }"
	for (10+len(header)+1)%64 != 0 {
		header += " "
	}
	header += "\n"
	out := []byte("\x93NUMPY\x01\x00")
	out = binary.LittleEndian.AppendUint16(out, uint16(len(header)))
	out = append(out, header...)
	for _, v := range vals {
		out = binary.LittleEndian.AppendUint32(out, math.Float32bits(v))
	}
	return out
}

func TestReadNPY(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "a.npy")
	require.NoError(t, os.WriteFile(p, npyBytes("(2, 3)", []float32{0, 1, 2, 3, 4, 5}), 0o644))
	shape, data, err := ReadNPY(p)
	require.NoError(t, err)
	assert.Equal(t, []int{2, 3}, shape)
	assert.Equal(t, []float32{0, 1, 2, 3, 4, 5}, data)

	require.NoError(t, os.WriteFile(p, npyBytes("(2, 4)", []float32{0, 1, 2}), 0o644))
	_, _, err = ReadNPY(p)
	assert.Error(t, err)
	require.NoError(t, os.WriteFile(p, []byte("nope"), 0o644))
	_, _, err = ReadNPY(p)
	assert.Error(t, err)
}

package cuda

import (
	"testing"

	"github.com/stretchr/testify/assert"

	"github.com/llama-orch/orch/sdk/ml"
)

var _ ml.Comm = (*comm)(nil)

func TestNCCLVersionString(t *testing.T) {
	for code, want := range map[int]string{
		22105: "2.21.5", 21903: "2.19.3", 20900: "2.9.0", 22703: "2.27.3",
		2804: "2.8.4", 2708: "2.7.8", // the pre-2.9 encoding X*1000 + Y*100 + Z
	} {
		assert.Equal(t, want, ncclVersionString(code), "code %d", code)
	}
}

func TestClosedBackendComm(t *testing.T) {
	b := &Backend{} // ctx 0: closed (or never opened)
	_, err := b.CommID()
	assert.ErrorContains(t, err, "closed")
	_, err = b.NewComm(make([]byte, CommIDBytes), 0, 2)
	assert.ErrorContains(t, err, "closed")
	_, err = b.NewComm(make([]byte, 16), 0, 2)
	assert.ErrorContains(t, err, "id of 16 bytes")
	for _, rs := range [][2]int{{0, 0}, {2, 2}, {-1, 2}} {
		_, err = b.NewComm(make([]byte, CommIDBytes), rs[0], rs[1])
		assert.ErrorContains(t, err, "rank", "rank %d size %d", rs[0], rs[1])
	}
	_, _, err = b.NCCLVersion()
	assert.ErrorContains(t, err, "closed")
}

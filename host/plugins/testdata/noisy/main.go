// Command noisy is a test fixture: the example adapter whose factory writes
// straight to file descriptor 1, as native (C/CUDA) initialisation code
// might. sdk.Serve must keep the go-plugin handshake intact.
package main

import (
	"log"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/example"
)

func main() {
	archs := []string{"noisy"}
	err := sdk.Serve(sdk.Info{Name: "noisy", Version: "0", Architectures: archs},
		func(l hclog.Logger) (sdk.Adapter, error) {
			_, _ = syscall.Write(1, []byte("cuda init: hello from native code\n"))
			return example.New(l, archs), nil
		})
	if err != nil {
		log.Fatal(err)
	}
}

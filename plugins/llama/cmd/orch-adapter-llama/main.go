// Command orch-adapter-llama is orch's adapter plugin for the llama
// architecture. orch-host launches it; it is not meant to be run by hand.
package main

import (
	"log"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/plugins/llama"
	"github.com/llama-orch/orch/sdk"
)

func main() {
	err := sdk.Serve(llama.Info(), func(logger hclog.Logger) (sdk.Adapter, error) { return llama.New(logger), nil })
	if err != nil {
		log.Fatal(err)
	}
}

// Command orch-adapter-gpt is orch's adapter plugin for the gpt-oss and gpt2
// architectures. orch-host launches it; it is not meant to be run by hand.
package main

import (
	"log"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/plugins/gpt"
	"github.com/llama-orch/orch/sdk"
)

func main() {
	err := sdk.Serve(gpt.Info(), func(logger hclog.Logger) (sdk.Adapter, error) { return gpt.New(logger), nil })
	if err != nil {
		log.Fatal(err)
	}
}

// Command orch-adapter-example is the example adapter plugin (package
// sdk/example): a counting "model" that needs no weights. Build it with
// -ldflags "-X main.name=NAME -X main.architectures=a,b" to get a copy with
// another name and architectures (the host's lifecycle tests do).
package main

import (
	"log"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/llama-orch/orch/sdk"
	"github.com/llama-orch/orch/sdk/example"
)

var (
	name          = "example"
	version       = "0.1.0"
	architectures = "example-counter"
)

func main() {
	archs := strings.Split(architectures, ",")
	err := sdk.Serve(
		sdk.Info{Name: name, Version: version, Architectures: archs, DTypes: []string{"F32"}, Features: []string{"logprobs"}},
		func(logger hclog.Logger) (sdk.Adapter, error) { return example.New(logger, archs), nil },
	)
	if err != nil {
		log.Fatal(err)
	}
}

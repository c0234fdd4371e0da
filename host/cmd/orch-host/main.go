// Command orch-host is orch's host: CLI, configuration, plugin lifecycle and HTTP API.
package main

import (
	"fmt"
	"os"

	"github.com/llama-orch/orch/host/cli"
)

func main() {
	if err := cli.NewRoot().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "orch-host:", err)
		os.Exit(1)
	}
}

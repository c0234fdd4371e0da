// Package layering holds no code: its test enforces the project's dependency
// rules (sdk imports nothing from host/ or plugins/; plugins import nothing
// from host/; orch-host builds with CGO_ENABLED=0).
package layering

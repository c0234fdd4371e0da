// Package hfrust is an optional tokenizer backend over Hugging Face's Rust
// tokenizers library (github.com/daulet/tokenizers, cgo). It is compiled only
// with the build tag "hftokenizers" and needs libtokenizers.a at link time
// (built from daulet/tokenizers' Rust crate: `cargo build --release`, then
// CGO_LDFLAGS=-L<dir with libtokenizers.a>).
//
// orch never needs it: the runtime tokenizes in pure Go from GGUF metadata
// (package tokenizer), because the Rust library and its git fork cannot be
// fetched or built in every environment orch is built in. This package exists
// as an independent reference: its test encodes the golden corpus with both
// the Rust library and package tokenizer from the same tokenizer.json and
// requires identical ids. CI type-checks it (`go vet -tags hftokenizers`,
// see the Makefile's lint target), which needs no Rust library; running the
// test needs the library and a tokenizer.json (ORCH_HF_TOKENIZER_JSON).
package hfrust

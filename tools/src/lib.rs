//! Operator tools for blockd. The `blockctl` binary (`src/bin/blockctl/`) is the
//! command-line client of the `blockd.v1` gRPC API; like every tool here it speaks only
//! the API and never links the engine.

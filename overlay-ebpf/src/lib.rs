#![no_std]
// Empty on purpose: this target lets overlay-user's build.rs depend on the crate, so cargo
// rebuilds the programs (src/main.rs) when they change.

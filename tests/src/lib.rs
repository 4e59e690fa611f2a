//! Shared test infrastructure: network namespaces ([`netns`]) and the
//! reference lab topology ([`lab`]). Used by the tests in `tests/tests/` and
//! by `cargo xtask run`, so it depends on nothing that needs the BPF build.
pub mod lab;
pub mod netns;
pub mod packet;

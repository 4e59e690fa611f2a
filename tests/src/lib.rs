//! Shared test infrastructure: network namespaces ([`netns`]), the reference
//! lab topology ([`lab`]), a packet builder ([`packet`]) and `WireGuard`
//! helpers ([`wg`]). Used by the tests in `tests/tests/` and by
//! `cargo xtask run`; xtask compiles before anything is installed, so this
//! library must not depend on zt-userspace (the BPF build): tests get it as a
//! dev-dependency.
pub mod lab;
pub mod netns;
pub mod packet;
pub mod wg;

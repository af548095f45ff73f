//! End-to-end machinery shared by the `kizuna-testbed` command
//! (`deploy/testbed`), the end-to-end tests that drive it and the chain
//! benchmark: see [`testbed`].

pub mod testbed;

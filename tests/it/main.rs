//! payoutd's integration tests: a real MariaDB (a fresh database per test), the simulated Money
//! server over real HTTP, and the real `payoutd` binary.

mod breaker;
mod cli_config;
mod foundation;
mod support;

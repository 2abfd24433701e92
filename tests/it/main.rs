//! payoutd's integration tests: a real MariaDB (a fresh database per test), the simulated Money
//! server over real HTTP, and the real `payoutd` binary.

mod alerts;
mod bench_smoke;
mod breaker;
mod cli_config;
mod dbproxy;
mod dead_letters;
mod explain;
mod failures;
mod foundation;
mod leases;
mod money_client;
mod scaleout;
mod statements;
mod support;
mod systemd;

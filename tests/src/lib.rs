//! Shared helpers for payoutd's integration tests, and the simulated Money server
//! ([`money_sim`]) that the tests and the `money-sim` binary run.

pub mod bench;
pub mod money_sim;

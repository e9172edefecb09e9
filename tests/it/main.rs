//! Integration tests: each starts a real server on a loopback port with its own RocksDB in a
//! temp dir and talks HTTP to it. One test binary, so the crate is built once.

mod accounts;
mod admin;
mod admin_more;
mod admin_reads;
mod analytics;
mod audit;
mod client_spec;
mod common;
mod connections;
mod correctness;
mod directory;
mod e2ee;
mod edge_cases;
mod ephemeral;
mod errors;
mod event_core;
mod graph;
mod limits;
mod media;
mod metrics;
mod offboarding;
mod operators;
mod process;
mod push;
mod pushers;
mod rooms;
mod sdk;
mod sdk_sliding;
mod sdk_threads;
mod search;
mod shared_secret;
mod sliding;
mod spaces;
mod sync;
mod threads;

//! Plaza: a Matrix homeserver for companies' group chat.
//!
//! Three layers: [`api`] (HTTP, thin), [`service`] (all Matrix behaviour) and [`storage`]
//! (RocksDB). [`server::Server`] wires them together so tests can run a real server in-process.

pub mod api;
pub mod config;
pub mod connections;
pub mod error;
pub mod outbound;
pub mod server;
pub mod service;
pub mod storage;

pub use config::Config;
pub use error::{Error, Result};
pub use server::Server;

/// Every allocation goes through mimalloc: a sync or a send makes many small, short-lived
/// allocations across threads, which it serves faster and returns to the system sooner than
/// the C library's allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

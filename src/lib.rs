//! forkcluster (docs in progress)
#![deny(unsafe_code, missing_docs)]

pub mod channel;
mod cluster;
mod error;
pub mod frame;
mod primary;
mod sys;
mod worker;

pub use cluster::{Builder, Cluster, ExitCode, ListenAddr, Schedule, MAX_IN_FLIGHT, MAX_LISTENERS};
pub use error::{Error, Result};
pub use primary::{Event, Primary, State, WorkerInfo};
pub use rustix::process::Signal;
pub use worker::{Connection, Message, Next, Stream, Worker};

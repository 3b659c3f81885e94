//! forkcluster (docs in progress)
#![deny(unsafe_code, missing_docs)]

pub mod channel;
mod error;
pub mod frame;
mod sys;

pub use error::{Error, Result};

//! The SMTP vocabulary of the pre-AUTH phase: line framing, commands, replies and the
//! EHLO capability rewrite. Nothing here does I/O.

pub mod command;
pub mod data;
pub mod ehlo;
pub mod line;
pub mod reply;
pub mod xclient;

pub use command::{Command, CommandError};
pub use ehlo::Capabilities;
pub use line::LineBuffer;
pub use reply::{BackendReply, Canned, Reply, canned};

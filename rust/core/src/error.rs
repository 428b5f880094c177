//! One error type for the crate. The Python glue maps each kind to a Python exception class.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// A shape or a value is wrong (Python `ValueError`).
    Value,
    /// A dtype or a device is wrong (Python `TypeError`).
    Type,
    /// The CUDA runtime failed or is missing (Python `RuntimeError`).
    Cuda,
    /// The caller's poll asked a long call to stop (Ctrl-C; Python `KeyboardInterrupt`).
    Interrupted,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

impl Error {
    pub fn value(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Value, message: message.into() }
    }
    pub fn dtype(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Type, message: message.into() }
    }
    pub fn cuda(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Cuda, message: message.into() }
    }
    pub fn interrupted(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Interrupted, message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

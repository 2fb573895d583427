//! One error type for the library.
//!
//! Every variant names *where* the problem is (a file, a tensor, an op) and *what* was
//! expected, because the user's only recourse for a bad checkpoint is to read the message.
//! The binary wraps these in `anyhow` for context; the library never panics on bad input.

use std::path::PathBuf;

/// Everything that can go wrong in zmoe.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O error on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file exists but its contents are not what zmoe expects.
    #[error("{}: {why}", path.display())]
    Format {
        /// The offending file.
        path: PathBuf,
        /// What is wrong and what was expected.
        why: String,
    },
    /// A tensor is missing or has the wrong shape or dtype.
    #[error("{}: tensor `{name}`: {why}", path.display())]
    Tensor {
        /// The file (shard or folder) the tensor was looked up in.
        path: PathBuf,
        /// The tensor key.
        name: String,
        /// What is wrong and what was expected.
        why: String,
    },
    /// An op received buffers of the wrong shape (a bug or a bad plan).
    #[error("{op}: expected {expected}, got {got}")]
    Shape {
        /// The op that checked.
        op: String,
        /// The expected shape.
        expected: String,
        /// The shape it got.
        got: String,
    },
    /// A user-supplied argument is invalid.
    #[error("{0}")]
    Arg(String),
    /// A backend (e.g. CUDA) is not available on this machine.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A CUDA driver or runtime call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// A forward pass produced NaN or infinite logits: broken weights or config, never a
    /// result to sample from.
    #[error("non-finite logits (NaN or infinity) for the token at position {position}{origin}")]
    NonFinite {
        /// Sequence position (0-based) of the first token whose logits are not finite.
        position: usize,
        /// Where the first non-finite value came from, if known (`; first non-finite value: …`).
        origin: String,
    },
    /// A fidelity check failed (`zmoe validate`, `zmoe matrix run`): exit status 3.
    #[error("{0}")]
    Fidelity(String),
    /// A kernel failed to compile.
    #[error("kernel compilation failed:\n{log}")]
    Compile {
        /// The compiler log.
        log: String,
    },
}

/// Library result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Error::Format { path: path.into(), why: why.into() }
    }

    /// Shorthand for [`Error::Tensor`].
    pub fn tensor(path: impl Into<PathBuf>, name: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Tensor { path: path.into(), name: name.into(), why: why.into() }
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

//! The library's one error type. Every variant says what was wrong and,
//! where it helps, which file or tensor it concerns.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {err}")]
    Io { path: PathBuf, err: std::io::Error },
    /// A file exists but its contents are malformed (truncated, bad magic, bad header).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A model configuration the engine cannot run.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A tensor is missing or has the wrong shape or type.
    #[error("tensor {name}: {msg}")]
    Tensor { name: String, msg: String },
    /// A user-provided argument is out of range or inconsistent.
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("backend {backend}: {msg}")]
    Backend { backend: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            err: source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn tensor(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor {
            name: name.into(),
            msg: msg.into(),
        }
    }
}

//! Bytes in and out, and nothing about methods or backends: the GGUF
//! reader and importer, the tokenizer rebuild, safetensors reading (mmap)
//! and writing, the ggml blocks file, text reading, and every output's writing (`output`).
pub mod ggml_blocks;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod import;
pub mod output;
pub mod safetensors_io;
pub mod safetensors_out;
pub mod text;
pub mod traces;

use crate::{Error, Result};
use std::fs::File;
use std::path::Path;

/// Refuses `path` unless it is a regular file (symbolic links followed),
/// before anything opens it: opening a FIFO for reading blocks until a
/// writer comes, and a device can be read without end. `what` is what was
/// expected there ("a GGUF file"), for the error.
pub fn check_regular(path: &Path, what: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(m) if m.is_dir() => Err(Error::format(
            path,
            format!("is a directory, where {what} was expected"),
        )),
        Ok(_) => Err(Error::format(
            path,
            format!("is not a regular file (a FIFO, socket or device), where {what} was expected"),
        )),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Opens `path` for reading after [`check_regular`]: the one way the
/// engine opens an input file.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    check_regular(path, what)?;
    File::open(path).map_err(|e| Error::io(path, e))
}

/// The bytes of the input file `path` ([`open_regular`]).
pub fn read_regular(path: &Path, what: &str) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut open_regular(path, what)?, &mut buf)
        .map_err(|e| Error::io(path, e))?;
    Ok(buf)
}

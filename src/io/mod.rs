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

/// The text of the input file `path` ([`read_regular`]), which must be UTF-8.
pub fn read_regular_text(path: &Path, what: &str) -> Result<String> {
    String::from_utf8(read_regular(path, what)?)
        .map_err(|e| Error::format(path, format!("is not UTF-8 text: {e}")))
}

/// sha256 of the input file `path`'s bytes ([`read_regular`]), lowercase
/// hex: the digest results record of their input files.
pub fn file_sha256(path: &Path, what: &str) -> Result<String> {
    use sha2::{Digest, Sha256};
    Ok(text::hex(&Sha256::digest(read_regular(path, what)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every library reader of an input file refuses a FIFO by name, at
    /// once (a regression would block on open: the read runs on a thread
    /// and the test fails after 30 s instead of hanging).
    #[cfg(unix)]
    #[test]
    fn readers_refuse_a_fifo_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("calib.jsonl");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        type Reader = fn(&Path) -> Result<()>;
        let readers: [(&str, Reader); 4] = [
            ("read_text", |p| text::read_text(p, None).map(drop)),
            ("jsonl_rows", |p| text::jsonl_rows(p).map(drop)),
            ("file_sha256", |p| file_sha256(p, "a file").map(drop)),
            ("read_regular_text", |p| {
                read_regular_text(p, "a file").map(drop)
            }),
        ];
        for (name, read) in readers {
            let (tx, rx) = std::sync::mpsc::channel();
            let path = fifo.clone();
            std::thread::spawn(move || tx.send(read(&path).map_err(|e| e.to_string())));
            let got = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("{name} blocked on a FIFO"));
            let e = got.expect_err(name);
            assert!(
                e.contains("not a regular file") && e.contains("calib.jsonl"),
                "{name}: {e}"
            );
        }
    }
}

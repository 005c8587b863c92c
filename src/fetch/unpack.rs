//! Unwrapping gzip and tar around a module, with the size cap applied to what comes out.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use flate2::read::GzDecoder;
use tempfile::NamedTempFile;

use crate::cache::store::Store;
use crate::digest::{Digest, Hasher};
use crate::error::{Code, Error, Result};

/// Which tar entry holds the module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarEntry {
    /// The first regular file (http/file urls, as Istio does).
    First,
    /// The entry whose file name is `plugin.wasm` (the OCI "compat" image layout).
    PluginWasm,
}

/// What comes out of a possibly wrapped blob.
#[derive(Debug)]
pub enum Unwrapped {
    /// The input was neither gzip nor tar: it is the module itself.
    Plain,
    /// The module, extracted into a new temp file, with its digest and size.
    Extracted(NamedTempFile, Digest, u64),
}

fn tar_magic(head: &[u8]) -> bool {
    head.len() >= 262 && &head[257..262] == b"ustar"
}

/// Looks inside `input`: gzip is decompressed, a tar archive is searched for `entry`. With
/// `require_tar`, an input that is not a (gzip'd) tar is an error. Blocking.
pub fn unwrap(
    store: &Store,
    input: &Path,
    max_size: u64,
    entry: TarEntry,
    require_tar: bool,
) -> Result<Unwrapped> {
    let io = |e: std::io::Error| Error::internal("reading fetched content", e);
    let mut file = File::open(input).map_err(io)?;
    let mut magic = [0u8; 2];
    let n = file.read(&mut magic).map_err(io)?;
    drop(file);
    let file = BufReader::new(File::open(input).map_err(io)?);
    let gz = n == 2 && magic == [0x1f, 0x8b];
    let mut reader: Box<dyn Read> = if gz {
        Box::new(GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut head = Vec::with_capacity(512);
    (&mut reader)
        .take(512)
        .read_to_end(&mut head)
        .map_err(|e| bad_archive(gz, e))?;
    if tar_magic(&head) {
        let chained = std::io::Cursor::new(head).chain(reader);
        return extract_tar(store, chained, max_size, entry)
            .map(|(f, d, s)| Unwrapped::Extracted(f, d, s));
    }
    if require_tar {
        return Err(Error::new(
            Code::InvalidModule,
            "the layer is declared as a tar archive but is not one",
        ));
    }
    if !gz {
        return Ok(Unwrapped::Plain);
    }
    let chained = std::io::Cursor::new(head).chain(reader);
    let (f, d, s) = copy_capped(store, chained, max_size, "the decompressed module")?;
    Ok(Unwrapped::Extracted(f, d, s))
}

fn bad_archive(gz: bool, e: std::io::Error) -> Error {
    let what = if gz { "gzip stream" } else { "archive" };
    Error::new(Code::InvalidModule, format!("corrupt {what}: {e}"))
}

fn extract_tar(
    store: &Store,
    reader: impl Read,
    max_size: u64,
    want: TarEntry,
) -> Result<(NamedTempFile, Digest, u64)> {
    let mut archive = tar::Archive::new(reader);
    let entries = archive.entries().map_err(|e| bad_archive(false, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad_archive(false, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let matches = match want {
            TarEntry::First => true,
            TarEntry::PluginWasm => entry
                .path()
                .ok()
                .and_then(|p| p.file_name().map(|n| n == "plugin.wasm"))
                .unwrap_or(false),
        };
        if matches {
            return copy_capped(store, entry, max_size, "the module in the archive");
        }
    }
    let what = match want {
        TarEntry::First => "no regular file",
        TarEntry::PluginWasm => "no plugin.wasm",
    };
    Err(Error::new(
        Code::InvalidModule,
        format!("the archive holds {what}"),
    ))
}

fn copy_capped(
    store: &Store,
    mut reader: impl Read,
    max_size: u64,
    what: &str,
) -> Result<(NamedTempFile, Digest, u64)> {
    let mut out = store.temp_file()?;
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = reader.read(&mut buf).map_err(|e| bad_archive(true, e))?;
        if n == 0 {
            break;
        }
        if hasher.len() + n as u64 > max_size {
            return Err(Error::new(
                Code::TooLarge,
                format!("{what} exceeds the maximum size of {max_size} bytes"),
            ));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::internal("writing extracted module", e))?;
    }
    let len = hasher.len();
    Ok((out, hasher.finish(), len))
}

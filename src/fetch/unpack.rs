//! Unwrapping gzip and tar around a module, with the size cap applied to what comes out.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::Path;

use flate2::read::GzDecoder;
use tempfile::NamedTempFile;

use crate::cache::store::Store;
use crate::digest::{Digest, Hasher};
use crate::error::{Code, Error};

/// Why unwrapping failed. Callers decide on the variant (the OCI compat image tries the
/// next layer on [`UnpackError::NoPluginWasm`]); the wire code is chosen once, in the
/// `From<UnpackError> for Error` below.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The fetched file could not be read back.
    #[error("reading fetched content: {0}")]
    Io(#[source] std::io::Error),
    /// The gzip stream or tar archive is damaged.
    #[error("corrupt {what}: {source}")]
    Corrupt {
        /// `gzip stream` or `archive`.
        what: &'static str,
        /// What the decoder said.
        #[source]
        source: std::io::Error,
    },
    /// A layer declared as tar+gzip is not a tar archive.
    #[error("the layer is declared as a tar archive but is not one")]
    NotTar,
    /// The archive has no regular file (http and file sources take the first one).
    #[error("the archive holds no regular file")]
    NoRegularFile,
    /// The archive has no `plugin.wasm` (the OCI compat layout).
    #[error("the archive holds no plugin.wasm")]
    NoPluginWasm,
    /// What came out is over the size cap.
    #[error("{what} exceeds the maximum size of {max} bytes")]
    TooLarge {
        /// Which content.
        what: &'static str,
        /// The cap.
        max: u64,
    },
    /// The store or the validator failed.
    #[error(transparent)]
    Other(#[from] Error),
}

impl From<UnpackError> for Error {
    fn from(e: UnpackError) -> Error {
        let code = match &e {
            UnpackError::Io(_) => Code::Internal,
            UnpackError::Corrupt { .. }
            | UnpackError::NotTar
            | UnpackError::NoRegularFile
            | UnpackError::NoPluginWasm => Code::InvalidModule,
            UnpackError::TooLarge { .. } => Code::TooLarge,
            UnpackError::Other(inner) => return inner.clone(),
        };
        Error::new(code, e.to_string())
    }
}

/// The result of an unwrapping step.
pub type Result<T, E = UnpackError> = std::result::Result<T, E>;

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
    let io = UnpackError::Io;
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
        return Err(UnpackError::NotTar);
    }
    if !gz {
        return Ok(Unwrapped::Plain);
    }
    let chained = std::io::Cursor::new(head).chain(reader);
    let (f, d, s) = copy_capped(store, chained, max_size, "the decompressed module")?;
    Ok(Unwrapped::Extracted(f, d, s))
}

fn bad_archive(gz: bool, e: std::io::Error) -> UnpackError {
    UnpackError::Corrupt {
        what: if gz { "gzip stream" } else { "archive" },
        source: e,
    }
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
    Err(match want {
        TarEntry::First => UnpackError::NoRegularFile,
        TarEntry::PluginWasm => UnpackError::NoPluginWasm,
    })
}

fn copy_capped(
    store: &Store,
    mut reader: impl Read,
    max_size: u64,
    what: &'static str,
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
            return Err(UnpackError::TooLarge {
                what,
                max: max_size,
            });
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::internal("writing extracted module", e))?;
    }
    let len = hasher.len();
    Ok((out, hasher.finish(), len))
}

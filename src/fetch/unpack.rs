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
    /// The archive (headers and skipped entries included) is over the module cap plus
    /// 1 MiB.
    #[error(
        "the archive holds more than the maximum module size plus 1 MiB (headers and skipped entries count)"
    )]
    ArchiveTooLarge,
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
            UnpackError::TooLarge { .. } | UnpackError::ArchiveTooLarge => Code::TooLarge,
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
    cancel: Option<&crate::blocking::Cancel>,
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
        // Every byte of the archive counts: headers of every kind (pax, GNU long names, which
        // the tar reader buffers whole) and skipped entries, not only the module.
        let budget = max_size.saturating_add(ARCHIVE_OVERHEAD);
        let counted = Counted {
            inner: std::io::Cursor::new(head).chain(reader),
            left: budget,
            cancel: cancel.cloned(),
        };
        return extract_tar(store, counted, max_size, entry)
            .map(|(f, d, s)| Unwrapped::Extracted(f, d, s));
    }
    if require_tar {
        return Err(UnpackError::NotTar);
    }
    if !gz {
        return Ok(Unwrapped::Plain);
    }
    let chained = Counted {
        inner: std::io::Cursor::new(head).chain(reader),
        left: u64::MAX,
        cancel: cancel.cloned(),
    };
    let (f, d, s) = copy_capped(store, chained, max_size, "the decompressed module")?;
    Ok(Unwrapped::Extracted(f, d, s))
}

/// Room for tar headers and padding beyond the module itself.
const ARCHIVE_OVERHEAD: u64 = 1 << 20;

/// Why a [`Counted`] reader stopped.
#[derive(Debug, thiserror::Error)]
#[error("the archive is larger than its budget")]
struct OverBudget;

/// A reader that fails once more than `left` bytes were read through it, or once nobody
/// waits for its result any more.
struct Counted<R> {
    /// The archive stream.
    inner: R,
    /// Bytes it may still yield.
    left: u64,
    /// Set when the fetch this is for timed out or was abandoned.
    cancel: Option<crate::blocking::Cancel>,
}

/// Why a [`Counted`] reader stopped early.
#[derive(Debug, thiserror::Error)]
#[error("abandoned")]
struct Abandoned;

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.cancel.as_ref().is_some_and(|c| c.is_set()) {
            crate::blocking::Cancel::note_stopped("unpacking module");
            return Err(std::io::Error::other(Abandoned));
        }
        if self.left == 0 {
            // One more byte would be over: tell apart "exactly at the budget" from "over".
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => Err(std::io::Error::other(OverBudget)),
            };
        }
        let want = buf.len().min(self.left.min(usize::MAX as u64) as usize);
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// True when `e` (or what it wraps) is a [`Counted`] reader's budget running out.
fn over_budget(e: &std::io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = e.get_ref().map(|e| e as _);
    while let Some(err) = cur {
        if err.is::<OverBudget>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn bad_archive(gz: bool, e: std::io::Error) -> UnpackError {
    if over_budget(&e) {
        return UnpackError::ArchiveTooLarge;
    }
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
            .map_err(|e| Error::io("writing extracted module", e))?;
    }
    let len = hasher.len();
    Ok((out, hasher.finish(), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gz(data: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A tar whose first entry is a GNU long-name header of `name_len` bytes, then
    /// `plugin.wasm`.
    fn long_name_tar(name_len: usize, module: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::GNULongName);
        h.set_size(name_len as u64);
        h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend(std::iter::repeat_n(b'a', name_len));
        out.resize(out.len().div_ceil(512) * 512, 0);
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(module.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "plugin.wasm", module).unwrap();
        out.extend(b.into_inner().unwrap());
        out
    }

    fn unwrap_bytes(bytes: &[u8], max: u64) -> Result<Unwrapped> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut f = store.temp_file().unwrap();
        f.write_all(bytes).unwrap();
        unwrap(&store, f.path(), max, TarEntry::PluginWasm, true, None)
    }

    /// Issue 9: a few MB of gzip could make the tar reader buffer a GNU long name (or pax
    /// header) of any size. Headers count toward the decompression cap now.
    #[test]
    fn issue_9_a_long_name_header_bomb_is_too_large() {
        let module = crate::testkit::wasm_module("m", 10);
        let bomb = gz(&long_name_tar(8 << 20, &module));
        assert!(bomb.len() < 64 << 10, "the bomb is small: {}", bomb.len());
        let e = Error::from(unwrap_bytes(&bomb, 1 << 20).unwrap_err());
        assert_eq!(e.code, Code::TooLarge, "{e}");
        // A modest long name within the budget is fine.
        let ok = gz(&long_name_tar(1000, &module));
        assert!(matches!(
            unwrap_bytes(&ok, 1 << 20),
            Err(UnpackError::NoPluginWasm)
        ));
    }

    #[test]
    fn issue_9_skipped_entries_count_toward_the_cap() {
        let module = crate::testkit::wasm_module("m", 10);
        let mut b = tar::Builder::new(Vec::new());
        let filler = vec![0u8; 3 << 20];
        let mut h = tar::Header::new_gnu();
        h.set_size(filler.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "README", filler.as_slice()).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(module.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "plugin.wasm", module.as_slice())
            .unwrap();
        let archive = gz(&b.into_inner().unwrap());
        let e = Error::from(unwrap_bytes(&archive, 1 << 20).unwrap_err());
        assert_eq!(e.code, Code::TooLarge, "{e}");
        assert!(matches!(
            unwrap_bytes(&archive, 4 << 20),
            Ok(Unwrapped::Extracted(..))
        ));
    }
}

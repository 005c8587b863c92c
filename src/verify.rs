//! Wasm validation of a module file, streamed so a large module is never held whole in memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use wasmparser::{Chunk, Parser, ValidPayload, Validator, WasmFeatures};

use crate::error::{Code, Error, Result};

/// The 4-byte magic every Wasm binary (core module or component) starts with.
const MAGIC: &[u8; 4] = b"\0asm";

/// Checks that `path` holds a valid Wasm core module or component: the magic and version
/// header, then full `wasmparser` validation. Blocking; call from `spawn_blocking`.
pub fn validate_file(path: &Path) -> Result<()> {
    let mut file = File::open(path).map_err(|e| Error::internal("opening module", e))?;
    let mut head = [0u8; 8];
    let mut got = 0;
    while got < head.len() {
        match file.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Error::internal("reading module", e)),
        }
    }
    if got < 8 || &head[..4] != MAGIC {
        return Err(Error::new(
            Code::InvalidModule,
            "not a Wasm binary: missing the \\0asm magic and version header",
        ));
    }
    let invalid = |e: wasmparser::BinaryReaderError| {
        Error::new(Code::InvalidModule, format!("invalid Wasm module: {e}"))
    };

    let mut validator = Validator::new_with_features(WasmFeatures::all());
    let mut stack: Vec<Parser> = Vec::new();
    let mut cur = Parser::new(0);
    let mut buf: Vec<u8> = head.to_vec();
    let mut eof = false;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let (payload, consumed) = match cur.parse(&buf, eof).map_err(invalid)? {
            Chunk::NeedMoreData(_) => {
                if eof {
                    return Err(Error::new(Code::InvalidModule, "truncated Wasm module"));
                }
                let n = file
                    .read(&mut chunk)
                    .map_err(|e| Error::internal("reading module", e))?;
                if n == 0 {
                    eof = true;
                } else {
                    buf.extend_from_slice(&chunk[..n]);
                }
                continue;
            }
            Chunk::Parsed { consumed, payload } => (payload, consumed),
        };
        match validator.payload(&payload).map_err(invalid)? {
            ValidPayload::Ok => {}
            ValidPayload::Parser(nested) => {
                stack.push(std::mem::replace(&mut cur, nested));
            }
            ValidPayload::Func(func, body) => {
                let mut fv = func.into_validator(Default::default());
                fv.validate(&body).map_err(invalid)?;
            }
            ValidPayload::End(_) => match stack.pop() {
                Some(parent) => cur = parent,
                None => {
                    buf.drain(..consumed);
                    // Anything after the end of the outermost module is garbage.
                    if !buf.is_empty()
                        || file
                            .read(&mut chunk)
                            .map_err(|e| Error::internal("reading module", e))?
                            != 0
                    {
                        return Err(Error::new(
                            Code::InvalidModule,
                            "invalid Wasm module: trailing bytes after the module",
                        ));
                    }
                    return Ok(());
                }
            },
        }
        buf.drain(..consumed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(bytes: &[u8]) -> Result<()> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        validate_file(f.path())
    }

    /// A module with one custom section, as the tests build them.
    fn module_with_custom(payload_len: usize) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        let name = b"x";
        let mut body = vec![name.len() as u8];
        body.extend_from_slice(name);
        body.extend(std::iter::repeat_n(7u8, payload_len));
        m.push(0);
        let mut n = body.len();
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                m.push(byte);
                break;
            }
            m.push(byte | 0x80);
        }
        m.extend(body);
        m
    }

    #[test]
    fn accepts_empty_and_large_modules() {
        check(b"\0asm\x01\0\0\0").unwrap();
        check(&module_with_custom(300_000)).unwrap();
    }

    #[test]
    fn rejects_garbage_truncation_and_trailing_bytes() {
        for bad in [
            &b""[..],
            b"\0asm",
            b"not wasm at all",
            b"\0asm\x02\0\0\0",
            &module_with_custom(100)[..50],
            b"\0asm\x01\0\0\0\x01\x05\x01\x60\x00",
        ] {
            assert_eq!(check(bad).unwrap_err().code, Code::InvalidModule, "{bad:?}");
        }
        let mut trailing = module_with_custom(10);
        trailing.push(0xff);
        assert_eq!(check(&trailing).unwrap_err().code, Code::InvalidModule);
    }
}

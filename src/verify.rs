//! Wasm validation of a module file, streamed so a large module is never held whole in memory.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use wasmparser::{Chunk, Parser, Payload, ValidPayload, Validator, WasmFeatures};

/// Custom sections larger than this are skipped without being read into memory: their
/// content does not take part in validation, and a module may be mostly one of them. Data
/// sections larger than this are streamed: each segment's header is validated, its bytes
/// are skipped.
const SKIP_CUSTOM_OVER: u64 = 64 << 10;

/// The custom section id.
const CUSTOM_SECTION: u8 = 0;
/// The data section id.
const DATA_SECTION: u8 = 11;
/// Most bytes a data segment's header (flags, memory index, offset expression) may take.
const MAX_SEGMENT_HEADER: usize = 64 << 10;

use crate::error::{Code, Error, Result};

/// The 4-byte magic every Wasm binary (core module or component) starts with.
const MAGIC: &[u8; 4] = b"\0asm";

/// Checks that `path` holds a valid Wasm core module or component: the magic and version
/// header, then full `wasmparser` validation. Blocking; call from `spawn_blocking`.
/// Stops early (an `internal` error nobody waits for) once `cancel` is set.
pub fn validate_file(path: &Path, cancel: Option<&crate::blocking::Cancel>) -> Result<()> {
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
    // True when the top-level parser is between sections (where a custom section may start),
    // and how many function bodies of the code section are still to come.
    let mut at_boundary = false;
    let mut bodies_left: u32 = 0;
    loop {
        if cancel.is_some_and(|c| c.is_set()) {
            crate::blocking::Cancel::note_stopped("validating module");
            return Err(Error::internal("validating module", "abandoned"));
        }
        if stack.is_empty()
            && at_boundary
            && matches!(buf.first(), Some(&CUSTOM_SECTION | &DATA_SECTION))
        {
            // Enough bytes for the section id and its size (a LEB128 u32: up to 5 bytes).
            while buf.len() < 6 && !eof {
                eof = read_more(&mut file, &mut chunk, &mut buf)?;
            }
            if let Some((size, leb_len)) = read_leb_u32(&buf[1..])
                && u64::from(size) > SKIP_CUSTOM_OVER
            {
                let id = buf[0];
                buf.drain(..1 + leb_len);
                let mut section = Section {
                    file: &mut file,
                    buf: &mut buf,
                    chunk: &mut chunk,
                    left: u64::from(size),
                };
                if id == CUSTOM_SECTION {
                    section.skip_rest()?;
                } else {
                    // The parser and validator see the same section with every segment's
                    // bytes left out: headers, counts and order are all still checked.
                    let body = section.data_headers()?;
                    let mut header = vec![DATA_SECTION];
                    write_leb_u32(&mut header, body.len() as u32);
                    header.extend_from_slice(&body);
                    buf.splice(0..0, header);
                    // The parser takes it from here, as a section like any other.
                    let (payload, consumed) = match cur.parse(&buf, eof).map_err(invalid)? {
                        Chunk::Parsed { consumed, payload } => (payload, consumed),
                        Chunk::NeedMoreData(_) => {
                            return Err(Error::internal("validating module", "data section"));
                        }
                    };
                    validator.payload(&payload).map_err(invalid)?;
                    buf.drain(..consumed);
                    at_boundary = true;
                }
                continue;
            }
        }
        let (payload, consumed) = match cur.parse(&buf, eof).map_err(invalid)? {
            Chunk::NeedMoreData(_) => {
                if eof {
                    return Err(Error::new(Code::InvalidModule, "truncated Wasm module"));
                }
                eof = read_more(&mut file, &mut chunk, &mut buf)?;
                continue;
            }
            Chunk::Parsed { consumed, payload } => (payload, consumed),
        };
        if stack.is_empty() {
            at_boundary = match &payload {
                Payload::CodeSectionStart { count, .. } => {
                    bodies_left = *count;
                    *count == 0
                }
                Payload::CodeSectionEntry(_) => {
                    bodies_left = bodies_left.saturating_sub(1);
                    bodies_left == 0
                }
                // A nested module or component: back at a boundary when it ends.
                Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => false,
                Payload::End(_) => false,
                _ => true,
            };
        }
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
                Some(parent) => {
                    cur = parent;
                    at_boundary = stack.is_empty();
                }
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

/// The rest of a section being streamed: what is buffered, then the file.
struct Section<'a> {
    /// The module file.
    file: &'a mut File,
    /// Bytes read and not yet consumed.
    buf: &'a mut Vec<u8>,
    /// Read buffer.
    chunk: &'a mut [u8],
    /// Bytes of the section not yet consumed.
    left: u64,
}

impl Section<'_> {
    /// Buffers up to `want` bytes of the section (fewer at its end).
    fn fill(&mut self, want: usize) -> Result<()> {
        let want = (want as u64).min(self.left) as usize;
        while self.buf.len() < want {
            if read_more(self.file, self.chunk, self.buf)? {
                return Err(Error::new(Code::InvalidModule, "truncated Wasm module"));
            }
        }
        Ok(())
    }

    /// Consumes `n` bytes of the section without keeping them.
    fn skip(&mut self, n: u64) -> Result<()> {
        if n > self.left {
            return Err(Error::new(
                Code::InvalidModule,
                "invalid Wasm module: a data segment runs past its section",
            ));
        }
        let in_buf = (self.buf.len() as u64).min(n);
        self.buf.drain(..in_buf as usize);
        let rest = n - in_buf;
        let skipped = std::io::copy(&mut (&mut *self.file).take(rest), &mut std::io::sink())
            .map_err(|e| Error::internal("reading module", e))?;
        if skipped < rest {
            return Err(Error::new(Code::InvalidModule, "truncated Wasm module"));
        }
        self.left -= n;
        Ok(())
    }

    /// Consumes what is left of the section.
    fn skip_rest(&mut self) -> Result<()> {
        self.skip(self.left)
    }

    /// Consumes `n` buffered bytes, returning them.
    fn take(&mut self, n: usize) -> Vec<u8> {
        self.left -= n as u64;
        self.buf.drain(..n).collect()
    }

    /// Streams a data section: its count and every segment's header are kept, with each
    /// segment's length rewritten to 0 and its bytes skipped. The section body that results.
    fn data_headers(&mut self) -> Result<Vec<u8>> {
        let bad = |e: wasmparser::BinaryReaderError| {
            Error::new(Code::InvalidModule, format!("invalid Wasm module: {e}"))
        };
        self.fill(5)?;
        let (count, n) = read_leb_u32(self.buf).ok_or_else(|| {
            Error::new(
                Code::InvalidModule,
                "invalid Wasm module: bad data segment count",
            )
        })?;
        let mut body = self.take(n);
        for _ in 0..count {
            self.fill(MAX_SEGMENT_HEADER)?;
            let (header_len, data_len) = {
                let mut r = wasmparser::BinaryReader::new(self.buf, 0);
                match r.read_var_u32().map_err(bad)? {
                    0 => {
                        r.read::<wasmparser::ConstExpr>().map_err(bad)?;
                    }
                    1 => {}
                    2 => {
                        r.read_var_u32().map_err(bad)?;
                        r.read::<wasmparser::ConstExpr>().map_err(bad)?;
                    }
                    flags => {
                        return Err(Error::new(
                            Code::InvalidModule,
                            format!("invalid Wasm module: data segment flags {flags}"),
                        ));
                    }
                }
                let header_len = r.current_position();
                (header_len, r.read_var_u32().map_err(bad)?)
            };
            body.extend(self.take(header_len));
            let (_, leb_len) = read_leb_u32(self.buf).ok_or_else(|| {
                Error::new(Code::InvalidModule, "invalid Wasm module: bad data length")
            })?;
            self.take(leb_len);
            body.push(0);
            self.skip(u64::from(data_len))?;
        }
        if self.left != 0 {
            return Err(Error::new(
                Code::InvalidModule,
                "invalid Wasm module: bytes after the last data segment",
            ));
        }
        Ok(body)
    }
}

/// Appends `v` as an unsigned LEB128.
fn write_leb_u32(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Appends the next read of `file` to `buf` (through `chunk`); true at the end of the file.
fn read_more(file: &mut File, chunk: &mut [u8], buf: &mut Vec<u8>) -> Result<bool> {
    let n = file
        .read(chunk)
        .map_err(|e| Error::internal("reading module", e))?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n == 0)
}

/// A LEB128 u32 at the start of `b`: its value and length; `None` when it is not complete
/// or not a valid u32.
fn read_leb_u32(b: &[u8]) -> Option<(u32, usize)> {
    let mut value: u64 = 0;
    for (i, byte) in b.iter().take(5).enumerate() {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return u32::try_from(value).ok().map(|v| (v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn check(bytes: &[u8]) -> Result<()> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        validate_file(f.path(), None)
    }

    /// A module with one custom section, as the tests build them.
    fn module_with_custom(payload_len: usize) -> Vec<u8> {
        crate::testkit::wasm_module("x", payload_len)
    }

    /// The sections of a module with one function whose body is `body`.
    fn function_sections(body: &[u8]) -> Vec<u8> {
        let mut m = vec![0x01, 0x04, 0x01, 0x60, 0x00, 0x00, 0x03, 0x02, 0x01, 0x00];
        m.extend([0x0a, (body.len() + 2) as u8, 0x01, body.len() as u8]);
        m.extend_from_slice(body);
        m
    }

    /// A module with one memory and a data section of `segments` (flags and memory index
    /// already encoded, then the offset expression) with `data` each; with a data count
    /// section when `count`.
    fn module_with_data(segments: &[&[u8]], data: &[u8], count: bool) -> Vec<u8> {
        let mut m = b"\0asm\x01\0\0\0".to_vec();
        m.extend([0x05, 0x03, 0x01, 0x00, 0x01]);
        if count {
            m.extend([0x0c, 0x01, segments.len() as u8]);
        }
        let mut body = Vec::new();
        write_leb_u32(&mut body, segments.len() as u32);
        for seg in segments {
            body.extend_from_slice(seg);
            write_leb_u32(&mut body, data.len() as u32);
            body.extend_from_slice(data);
        }
        m.push(DATA_SECTION);
        write_leb_u32(&mut m, body.len() as u32);
        m.extend(body);
        m
    }

    /// Issue 9: data sections were read whole into memory during validation. Large ones are
    /// now streamed: every segment header is validated, the bytes are skipped.
    #[test]
    fn issue_9_large_data_sections_are_streamed_and_their_headers_validated() {
        let data = vec![0x5a; 3 << 20];
        let active: &[u8] = &[0x00, 0x41, 0x00, 0x0b];
        let passive: &[u8] = &[0x01];
        let active_mem0: &[u8] = &[0x02, 0x00, 0x41, 0x10, 0x0b];
        for count in [false, true] {
            check(&module_with_data(
                &[active, passive, active_mem0],
                &data,
                count,
            ))
            .unwrap();
        }
        // What a validator checks in a header still fails: no memory 3, a non-constant
        // offset, unknown flags.
        for bad in [
            &[0x02, 0x03, 0x41, 0x00, 0x0b][..],
            &[0x00, 0x6a, 0x0b][..],
            &[0x07][..],
        ] {
            let e = check(&module_with_data(&[active, bad], &data, false)).unwrap_err();
            assert_eq!(e.code, Code::InvalidModule, "{bad:?}");
        }
        let good = module_with_data(&[active], &data, false);
        let e = check(&good[..good.len() - 10]).unwrap_err();
        assert_eq!(e.code, Code::InvalidModule, "truncated");
        // A data count that disagrees with the section.
        let mut wrong_count = module_with_data(&[active, passive], &data, true);
        wrong_count[15] = 3;
        assert_eq!(check(&wrong_count).unwrap_err().code, Code::InvalidModule);
    }

    /// Issue 9: a custom section was read whole into memory during validation. Large ones
    /// are now skipped in bounded reads; what follows them is still validated.
    #[test]
    fn issue_9_large_custom_sections_are_skipped_and_the_rest_still_validated() {
        let big = module_with_custom(5 << 20);
        check(&big).unwrap();
        assert_eq!(
            check(&big[..big.len() - 100]).unwrap_err().code,
            Code::InvalidModule,
            "a truncated large custom section"
        );
        let mut trailing = big.clone();
        trailing.push(0xff);
        assert_eq!(check(&trailing).unwrap_err().code, Code::InvalidModule);
        // Custom section first, then a function: the function is validated.
        let good_fn = [0x00, 0x0b];
        let bad_fn = [0x00, 0x6a, 0x0b]; // i32.add on an empty stack
        let mut ok = big.clone();
        ok.extend(function_sections(&good_fn));
        check(&ok).unwrap();
        let mut bad = big.clone();
        bad.extend(function_sections(&bad_fn));
        assert_eq!(check(&bad).unwrap_err().code, Code::InvalidModule);
        // A function, then the large custom section.
        let mut after = b"\0asm\x01\0\0\0".to_vec();
        after.extend(function_sections(&good_fn));
        after.extend_from_slice(&big[8..]);
        check(&after).unwrap();
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

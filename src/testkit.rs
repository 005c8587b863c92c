//! Test artifacts shared by the unit tests, the integration tests and the benchmark: one
//! builder of valid Wasm modules. Not part of the daemon's behaviour.

/// A valid core Wasm module, unique per `name`, with `pad` extra bytes in a custom section
/// named `name`.
pub fn wasm_module(name: &str, pad: usize) -> Vec<u8> {
    let mut body = Vec::new();
    leb(&mut body, name.len());
    body.extend_from_slice(name.as_bytes());
    body.extend(std::iter::repeat_n(0x42u8, pad));
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.push(0);
    leb(&mut m, body.len());
    m.extend(body);
    m
}

/// A valid core Wasm module with one memory and one passive data segment of `size` bytes.
pub fn data_module(size: usize) -> Vec<u8> {
    let mut body = vec![0x01, 0x01];
    leb(&mut body, size);
    body.resize(body.len() + size, 0x5a);
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend([0x05, 0x03, 0x01, 0x00, 0x01]);
    m.push(0x0b);
    leb(&mut m, body.len());
    m.extend(body);
    m
}

/// Unsigned LEB128.
fn leb(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn modules_validate_and_differ_by_name() {
        let a = super::wasm_module("a", 3);
        let b = super::wasm_module("b", 3);
        assert_ne!(a, b);
        wasmparser::Validator::new().validate_all(&a).unwrap();
        wasmparser::Validator::new()
            .validate_all(&super::wasm_module("big", 200_000))
            .unwrap();
        wasmparser::Validator::new()
            .validate_all(&super::data_module(100_000))
            .unwrap();
    }
}

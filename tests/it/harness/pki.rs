//! A test CA and a server certificate for 127.0.0.1, for the TLS registry.

use super::*;

/// A test CA and a server certificate for 127.0.0.1 / localhost, made once per test binary
/// with the openssl command.
pub struct Pki {
    /// Holds the files.
    _dir: tempfile::TempDir,
    /// CA certificate (PEM).
    pub ca_cert: PathBuf,
    /// Server certificate signed by the CA.
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Token-signing certificate (the registry's `rootcertbundle`).
    pub signer_cert: PathBuf,
    /// Token-signing key (PKCS#8 PEM).
    pub signer_key: PathBuf,
}

/// The test PKI (see [`Pki`]).
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let p = |n: &str| dir.path().join(n);
        let run = |args: &[&str]| {
            let out = Command::new("openssl").args(args).current_dir(dir.path()).output().expect("openssl is installed");
            assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        std::fs::write(
            p("server.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "3", "-subj", "/CN=wasm-cache test CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        run(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
        run(&["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "3", "-extfile", "server.ext"]);
        run(&["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "signer.key", "-out", "signer.pem", "-days", "3", "-subj", "/CN=wasm-cache test token signer"]);
        Pki {
            signer_cert: p("signer.pem"),
            signer_key: p("signer.key"),
            ca_cert: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            _dir: dir,
        }
    })
}

//! TLS for the registry endpoint's TCP listener (`[registry] cert_file`/`key_file`):
//! handshakes run in their own tasks, bounded in number and time, so a client that never
//! finishes one holds neither the accept loop nor more than its own slot.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// Handshakes in progress at most; more connections are closed at once.
const MAX_HANDSHAKES: usize = 256;

/// A TCP listener that yields connections once their TLS handshake is done.
pub struct TlsListener {
    /// The TCP side.
    tcp: TcpListener,
    /// The server configuration.
    acceptor: TlsAcceptor,
    /// Finished handshakes.
    ready: mpsc::Receiver<TlsStream<TcpStream>>,
    /// Where handshake tasks send their connection.
    done: mpsc::Sender<TlsStream<TcpStream>>,
    /// Slots for handshakes in progress.
    slots: Arc<Semaphore>,
    /// How long a handshake may take (`[server] header_read_timeout`).
    timeout: Duration,
}

impl TlsListener {
    /// A TLS listener over `tcp` with the PEM `cert` chain and `key`.
    pub fn new(
        tcp: TcpListener,
        cert: &[u8],
        key: &[u8],
        timeout: Duration,
    ) -> std::io::Result<TlsListener> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what}: {e}"))
        };
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<_, _>>()
            .map_err(|e| bad("registry.cert_file", &e))?;
        if chain.is_empty() {
            return Err(bad("registry.cert_file", &"no certificate"));
        }
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("registry.key_file", &e))?;
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| bad("registry TLS", &e))?;
        let (done, ready) = mpsc::channel(MAX_HANDSHAKES);
        Ok(TlsListener {
            tcp,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            ready,
            done,
            slots: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            timeout,
        })
    }
}

impl crate::listen::Accept for TlsListener {
    type Io = TlsStream<TcpStream>;

    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        loop {
            tokio::select! {
                Some(conn) = self.ready.recv() => return Ok(conn),
                accepted = self.tcp.accept() => {
                    let (sock, _) = accepted?;
                    let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
                        continue;
                    };
                    let (acceptor, done, timeout) =
                        (self.acceptor.clone(), self.done.clone(), self.timeout);
                    tokio::spawn(async move {
                        let _slot = slot;
                        match tokio::time::timeout(timeout, acceptor.accept(sock)).await {
                            Ok(Ok(conn)) => {
                                let _ = done.send(conn).await;
                            }
                            Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                            Err(_) => tracing::debug!("TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    }
}

impl crate::listen::direct::Wire for TlsStream<TcpStream> {
    /// Never called: the TLS listener has no shortcut (its bytes are encrypted in user
    /// space, so there is nothing for `sendfile` to do).
    async fn sendfile(
        &self,
        _file: &std::fs::File,
        _offset: u64,
        _count: usize,
    ) -> std::io::Result<usize> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "sendfile over TLS",
        ))
    }
}

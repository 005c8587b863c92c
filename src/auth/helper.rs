//! Docker credential helpers (`docker-credential-<name> get`), for node credentials only and
//! only when `[auth] allow_credential_helpers = true`. A pull secret never runs a program.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;

use super::{Credential, Secret};
use crate::error::{Code, Error, Result};

/// Asks helper `name` for the credential of `server` (a registry host). `Ok(None)` when the
/// helper has none.
pub async fn get(name: &str, server: &str) -> Result<Option<Credential>> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(Error::new(
            Code::Forbidden,
            format!("invalid credential helper name {name:?}"),
        ));
    }
    let program = format!("docker-credential-{name}");
    let mut child = tokio::process::Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Error::internal(&format!("running {program}"), e))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes()).await;
    }
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output())
        .await
        .map_err(|_| Error::new(Code::Timeout, format!("{program} did not answer")))?
        .map_err(|e| Error::internal(&format!("running {program}"), e))?;
    if !out.status.success() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(rename = "Username", default)]
        username: String,
        #[serde(rename = "Secret", default)]
        secret: String,
    }
    let a: Answer = serde_json::from_slice(&out.stdout).map_err(|_| {
        Error::new(
            Code::Internal,
            format!("{program} answered something other than JSON"),
        )
    })?;
    if a.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credential::new(a.username, Secret::new(a.secret))))
}

//! Installing the internal root into the system's trust store (`edge ca trust`), as
//! `caddy trust` does, and taking it out again (`edge ca untrust`).
//!
//! Debian and Ubuntu keep extra roots in `/usr/local/share/ca-certificates` and rebuild the
//! bundle with `update-ca-certificates`; Fedora and RHEL use `/etc/pki/ca-trust/source/anchors`
//! and `update-ca-trust extract`. The file is named for the root's fingerprint, so edges with
//! different storage folders do not overwrite each other's roots.

use std::path::{Path, PathBuf};
use std::process::Command;

use aws_lc_rs::digest;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::Error;

struct SystemStore {
    dir: &'static str,
    update: &'static str,
    args: &'static [&'static str],
}

const STORES: [SystemStore; 2] = [
    SystemStore {
        dir: "/usr/local/share/ca-certificates",
        update: "update-ca-certificates",
        args: &[],
    },
    SystemStore {
        dir: "/etc/pki/ca-trust/source/anchors",
        update: "update-ca-trust",
        args: &["extract"],
    },
];

fn store() -> Result<&'static SystemStore, Error> {
    STORES
        .iter()
        .find(|s| Path::new(s.dir).is_dir() && which(s.update))
        .ok_or_else(|| {
            Error::Trust(
                "no known system trust store: install ca-certificates (Debian: \
                 /usr/local/share/ca-certificates and update-ca-certificates)"
                    .into(),
            )
        })
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/usr/bin", "/sbin"]
            .iter()
            .any(|d| Path::new(d).join(program).is_file())
}

/// The file name the root is installed under.
fn file_name(root_pem: &str) -> Result<String, Error> {
    let der = CertificateDer::from_pem_slice(root_pem.as_bytes())
        .map_err(|e| Error::Trust(format!("the root certificate is not PEM: {e}")))?;
    let hash = digest::digest(&digest::SHA256, &der);
    let hex: String = hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("labkit-edge-root-{hex}.crt"))
}

fn update(store: &SystemStore) -> Result<(), Error> {
    let output = Command::new(store.update)
        .args(store.args)
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .output()
        .map_err(|e| Error::Trust(format!("running {}: {e}", store.update)))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Trust(format!(
            "{} failed ({}): {}",
            store.update,
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Installs `root_pem` into the system store; returns the file written.
pub(crate) fn trust(root_pem: &str) -> Result<PathBuf, Error> {
    let store = store()?;
    let path = Path::new(store.dir).join(file_name(root_pem)?);
    let temp = path.with_extension("crt.tmp");
    std::fs::write(&temp, root_pem)
        .and_then(|()| std::fs::rename(&temp, &path))
        .map_err(|source| Error::Io {
            what: format!("writing {}", path.display()),
            source,
        })?;
    update(store)?;
    Ok(path)
}

/// Removes `root_pem` from the system store; returns the file removed, if it was there.
pub(crate) fn untrust(root_pem: &str) -> Result<Option<PathBuf>, Error> {
    let store = store()?;
    let path = Path::new(store.dir).join(file_name(root_pem)?);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            update(store)?;
            Ok(Some(path))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(Error::Io {
            what: format!("removing {}", path.display()),
            source,
        }),
    }
}

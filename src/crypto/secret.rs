//! The ring secret: 32 random bytes every member holds. It never crosses the wire; the
//! ring's TLS certificate authority is derived from it (see `tls`), so holding it is
//! what lets a process prove membership and check that others are members.

use std::path::{Path, PathBuf};

/// Name of the secret inside a peer's data directory.
pub const SECRET_FILE: &str = "ring.secret";
/// Environment variable that may carry the secret itself (rather than a file).
pub const SECRET_ENV: &str = "MUTUALSTORE_SECRET";
const PREFIX: &str = "mss1-";

#[derive(Clone, PartialEq, Eq)]
pub struct RingSecret([u8; 32]);

impl std::fmt::Debug for RingSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never printed: a secret that reaches a log is no longer one.
        write!(f, "RingSecret(ring {})", self.ring_id())
    }
}

impl RingSecret {
    pub fn generate() -> RingSecret {
        RingSecret(super::random32())
    }

    pub fn parse(text: &str) -> Result<RingSecret, String> {
        super::parse_hex32(text, PREFIX, "the ring secret").map(RingSecret)
    }

    /// The text form, as stored in secret files and MUTUALSTORE_SECRET.
    pub fn to_text(&self) -> String {
        format!("{PREFIX}{}", super::hex(&self.0))
    }

    /// A public name for the ring (safe to log): a hash of the secret.
    pub fn ring_id(&self) -> String {
        super::hex(&self.derive("mutualstore ring id v1")[..6])
    }

    pub fn derive(&self, label: &str) -> [u8; 32] {
        super::derive(&self.0, b"mutualstore ring secret", label)
    }

    pub fn load(path: &Path) -> Result<RingSecret, String> {
        let text = super::read_private(path, "secret file")?;
        RingSecret::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        super::write_private(path, &format!("{}\n", self.to_text()))
    }
}

/// The secret a command was given: `--secret-file`, else MUTUALSTORE_SECRET.
pub fn given(secret_file: Option<&Path>) -> Result<Option<RingSecret>, String> {
    Ok(match (secret_file, std::env::var(SECRET_ENV).ok().filter(|s| !s.trim().is_empty())) {
        (Some(f), _) => Some(RingSecret::load(f)?),
        (None, Some(text)) => Some(RingSecret::parse(&text).map_err(|e| format!("{SECRET_ENV}: {e}"))?),
        (None, None) => None,
    })
}

/// A peer's secret: the one given, else the copy in its data directory (where a given
/// one is kept, so a restart needs no flag). None: a ring without a secret (no TLS).
pub fn settle(given: Option<RingSecret>, dir: &Path) -> Result<Option<RingSecret>, String> {
    let stored_path: PathBuf = dir.join(SECRET_FILE);
    let stored = if stored_path.exists() { Some(RingSecret::load(&stored_path)?) } else { None };
    match (given, stored) {
        (Some(g), Some(s)) if g != s => Err(format!(
            "{} belongs to ring {}, but the secret given is for ring {}",
            dir.display(),
            s.ring_id(),
            g.ring_id()
        )),
        (Some(g), None) => {
            if dir.exists() {
                g.save(&stored_path)?;
            }
            Ok(Some(g))
        }
        (g, s) => Ok(s.or(g)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn text_roundtrips_and_nonsense_is_refused() {
        let s = RingSecret::generate();
        assert_eq!(RingSecret::parse(&s.to_text()).unwrap(), s);
        assert_eq!(RingSecret::parse(&format!("  {}\n", s.to_text())).unwrap(), s);
        assert!(RingSecret::parse("mss1-abc").is_err());
        assert!(RingSecret::parse(&s.to_text().replace("mss1-", "xxx1-")).is_err());
        assert!(!format!("{s:?}").contains(&s.to_text()[5..]), "Debug must not print the secret");
        assert_ne!(RingSecret::generate(), s);
    }

    #[test]
    fn files_are_private_and_world_readable_ones_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let s = RingSecret::generate();
        s.save(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(RingSecret::load(&p).unwrap(), s);
        assert!(s.save(&p).is_err(), "never overwrites");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = RingSecret::load(&p).unwrap_err();
        assert!(e.contains("readable by others"), "{e}");
        let e = RingSecret::load(&d.path().join("missing")).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn a_data_dir_keeps_its_ring() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("given");
        let s = RingSecret::generate();
        s.save(&f).unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let given = RingSecret::load(&f).unwrap();
        assert_eq!(settle(Some(given), &data).unwrap(), Some(s.clone()));
        assert_eq!(settle(None, &data).unwrap(), Some(s), "stored with the data");
        assert!(settle(Some(RingSecret::generate()), &data).unwrap_err().contains("belongs to ring"));
        assert_eq!(settle(None, &d.path().join("nothing")).unwrap(), None);
    }
}

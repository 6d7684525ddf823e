//! Everything secret: the ring secret that makes a process a member (`secret`), the TLS
//! identities derived from it that every peer-to-peer connection uses (`tls`), and the
//! file key with which a mount encrypts data and metadata before anything leaves it
//! (`seal`). Primitives come from `ring` and `rustls`; nothing here invents crypto.

pub mod seal;
pub mod secret;
pub mod tls;

/// Writes `contents` to a new file readable by its owner only. Refuses to overwrite.
pub fn write_private(path: &std::path::Path, contents: &str) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes()).and_then(|_| f.sync_all()).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a file that must be readable by its owner only.
pub fn read_private(path: &std::path::Path, what: &str) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let md = std::fs::metadata(path).map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if !md.is_file() {
        return Err(format!("{what} {} is not a file", path.display()));
    }
    let mode = md.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!("{what} {} is readable by others (mode {mode:o}): run chmod 600 on it", path.display()));
    }
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// HKDF-SHA256 of `ikm` with `salt` and the label `info`, 32 bytes.
pub fn derive(ikm: &[u8], salt: &[u8], info: &str) -> [u8; 32] {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, salt).extract(ikm);
    let info = [info.as_bytes()];
    let okm = prk.expand(&info, Len32).expect("32 bytes is a valid HKDF-SHA256 output length");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("length matches");
    out
}

/// Parses `<prefix><64 hex digits>` (surrounding whitespace ignored).
fn parse_hex32(text: &str, prefix: &str, what: &str) -> Result<[u8; 32], String> {
    let t = text.trim();
    let hex = t.strip_prefix(prefix).ok_or_else(|| format!("{what} does not start with {prefix:?}"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{what} is not {prefix} followed by 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| format!("{what}: bad hex"))?;
    }
    Ok(out)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random32() -> [u8; 32] {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut b).expect("the OS random source works");
    b
}

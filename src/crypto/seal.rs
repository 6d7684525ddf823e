//! The file key and the AEAD that uses it. A mount encrypts every chunk of file data and
//! every metadata record with keys derived from its file key before erasure coding, so
//! storage peers (which never receive the key) hold and serve only ciphertext.
//!
//! Each sealed object starts with a 16-byte header: 4 bytes of magic and 12 random
//! bytes. The header is the HKDF salt of a key used for that one object (AES-256-GCM,
//! all-zero nonce: one key, one message, so no nonce can repeat however many objects a
//! key seals), and is authenticated as associated data together with the caller's
//! context (a record's key and version), so a peer cannot move or replay ciphertext to
//! another place or version without failing the tag.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use std::path::Path;

pub const HEADER: usize = 16;
pub const TAG: usize = 16;
/// What sealing adds to an object.
pub const OVERHEAD: usize = HEADER + TAG;
const KEY_PREFIX: &str = "msk1-";
/// Environment variable naming the key file when --key-file is not given.
pub const KEY_FILE_ENV: &str = "MUTUALSTORE_KEY_FILE";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Chunk,
    Record,
}

impl Purpose {
    fn magic(self) -> &'static [u8; 4] {
        match self {
            Purpose::Chunk => b"MSC2",
            Purpose::Record => b"MSR2",
        }
    }
}

#[derive(Clone)]
pub struct FileKey {
    data_key: [u8; 32],
    fsid: String,
}

impl std::fmt::Debug for FileKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FileKey(fs {})", &self.fsid[..8])
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpenError {
    #[error("sealed object of {0} bytes is too short")]
    TooShort(usize),
    #[error("not a sealed {0:?} (bad magic)")]
    BadMagic(Purpose),
    #[error("authentication failed: altered, misplaced or sealed with another key")]
    Forged,
}

impl FileKey {
    pub fn from_bytes(master: [u8; 32]) -> FileKey {
        let data_key = super::derive(&master, b"mutualstore file key", "data v1");
        let id = super::derive(&master, b"mutualstore file key", "filesystem id v1");
        FileKey { data_key, fsid: super::hex(&id[..16]) }
    }

    pub fn generate() -> ([u8; 32], FileKey) {
        let m = super::random32();
        (m, FileKey::from_bytes(m))
    }

    /// The filesystem this key opens. Record keys are derived from it, so without the
    /// key the records of a filesystem cannot even be found.
    pub fn fsid(&self) -> &str {
        &self.fsid
    }

    /// Loads the key at `path`, or creates it (0600) if there is none yet.
    pub fn load_or_create(path: &Path) -> Result<(FileKey, bool), String> {
        if path.exists() {
            let text = super::read_private(path, "key file")?;
            let m = super::parse_hex32(&text, KEY_PREFIX, "the file key").map_err(|e| format!("{}: {e}", path.display()))?;
            return Ok((FileKey::from_bytes(m), false));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let (m, k) = FileKey::generate();
        super::write_private(path, &format!("{KEY_PREFIX}{}\n", super::hex(&m)))?;
        Ok((k, true))
    }

    fn object_key(&self, header: &[u8]) -> LessSafeKey {
        let k = super::derive(&self.data_key, header, "object v1");
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte AES-256 key"))
    }

    /// Header ++ ciphertext ++ tag of `plain`, bound to `context`.
    pub fn seal(&self, purpose: Purpose, context: &[u8], plain: &[u8]) -> Vec<u8> {
        self.seal_with_room(purpose, context, plain, 0)
    }

    /// `seal`, into a buffer with `room` bytes of spare capacity (for a stripe's padding).
    pub fn seal_with_room(&self, purpose: Purpose, context: &[u8], plain: &[u8], room: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(plain.len() + OVERHEAD + room);
        out.extend_from_slice(purpose.magic());
        let mut salt = [0u8; HEADER - 4];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt).expect("the OS random source works");
        out.extend_from_slice(&salt);
        out.extend_from_slice(plain);
        let key = self.object_key(&out[..HEADER]);
        let aad = aad(&out[..HEADER], context);
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key([0; 12]), Aad::from(&aad), &mut out[HEADER..])
            .expect("AES-GCM seals any length below 64 GiB");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// The plaintext of a sealed object, or why it is not to be trusted.
    pub fn open(&self, purpose: Purpose, context: &[u8], mut sealed: Vec<u8>) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < OVERHEAD {
            return Err(OpenError::TooShort(sealed.len()));
        }
        if &sealed[..4] != purpose.magic() {
            return Err(OpenError::BadMagic(purpose));
        }
        let key = self.object_key(&sealed[..HEADER]);
        let aad = aad(&sealed[..HEADER], context);
        // Decrypts and moves the plaintext to the front in one pass (no second 4 MiB copy).
        let n = key
            .open_within(Nonce::assume_unique_for_key([0; 12]), Aad::from(&aad), &mut sealed, HEADER..)
            .map_err(|_| OpenError::Forged)?
            .len();
        sealed.truncate(n);
        Ok(sealed)
    }
}

fn aad(header: &[u8], context: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + context.len());
    a.extend_from_slice(header);
    a.extend_from_slice(context);
    a
}

/// Pads a record's plaintext so that its stored size tells a peer only roughly how big
/// it is: a 4-byte length, the bytes, zeros up to the next size class (steps of 1/8).
pub fn pad(plain: &[u8]) -> Vec<u8> {
    let n = plain.len() + 4;
    let step = (n.next_power_of_two() / 8).max(256);
    let padded = n.div_ceil(step) * step;
    let mut out = Vec::with_capacity(padded);
    out.extend_from_slice(&(plain.len() as u32).to_be_bytes());
    out.extend_from_slice(plain);
    out.resize(padded, 0);
    out
}

pub fn unpad(mut padded: Vec<u8>) -> Result<Vec<u8>, String> {
    if padded.len() < 4 {
        return Err("padded record shorter than its length field".into());
    }
    let n = u32::from_be_bytes(padded[..4].try_into().expect("4 bytes")) as usize;
    if n > padded.len() - 4 {
        return Err(format!("padded record claims {n} bytes in {}", padded.len() - 4));
    }
    padded.copy_within(4..4 + n, 0);
    padded.truncate(n);
    Ok(padded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn seal_open_roundtrip_and_every_alteration_is_refused() {
        let (_, k) = FileKey::generate();
        let plain = b"MUTUALSTORE marker: secret bytes".to_vec();
        let s = k.seal(Purpose::Chunk, b"ctx", &plain);
        assert_eq!(s.len(), plain.len() + OVERHEAD);
        assert!(!s.windows(plain.len()).any(|w| w == plain.as_slice()), "ciphertext hides the plaintext");
        assert_ne!(k.seal(Purpose::Chunk, b"ctx", &plain), s, "fresh salt each time");
        assert_eq!(k.open(Purpose::Chunk, b"ctx", s.clone()).unwrap(), plain);
        assert_eq!(k.open(Purpose::Chunk, b"other", s.clone()), Err(OpenError::Forged), "bound to its context");
        assert_eq!(k.open(Purpose::Record, b"ctx", s.clone()), Err(OpenError::BadMagic(Purpose::Record)));
        let (_, other) = FileKey::generate();
        assert_eq!(other.open(Purpose::Chunk, b"ctx", s.clone()), Err(OpenError::Forged));
        assert_ne!(other.fsid(), k.fsid());
        for i in 4..s.len() {
            let mut bad = s.clone();
            bad[i] ^= 0x40;
            assert_eq!(k.open(Purpose::Chunk, b"ctx", bad), Err(OpenError::Forged), "flip at byte {i}");
        }
        assert_eq!(k.open(Purpose::Chunk, b"ctx", s[..s.len() - 1].to_vec()), Err(OpenError::Forged));
        assert_eq!(k.open(Purpose::Chunk, b"ctx", s[..10].to_vec()), Err(OpenError::TooShort(10)));
    }

    #[test]
    fn key_files_are_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/my.key");
        let (k, created) = FileKey::load_or_create(&p).unwrap();
        assert!(created);
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let (k2, created) = FileKey::load_or_create(&p).unwrap();
        assert!(!created);
        assert_eq!(k.fsid(), k2.fsid());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(FileKey::load_or_create(&p).unwrap_err().contains("readable by others"));
    }

    proptest! {
        #[test]
        fn pad_roundtrips_within_an_eighth(data in proptest::collection::vec(any::<u8>(), 0..20_000)) {
            let p = pad(&data);
            prop_assert!(p.len() >= data.len() + 4);
            prop_assert!(p.len() <= (data.len() + 4) + (data.len() + 4) / 4 + 256);
            prop_assert_eq!(unpad(p).unwrap(), data);
        }

        #[test]
        fn open_never_panics_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let k = FileKey::from_bytes([7; 32]);
            prop_assert!(k.open(Purpose::Record, b"", data).is_err());
        }
    }
}

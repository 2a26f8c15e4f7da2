//! Keyed clusters: authenticated encryption of every datagram at the transport boundary.
//!
//! A keyed endpoint seals every datagram it sends with the primary key of its [`Keyring`]
//! (XChaCha20-Poly1305, random 192-bit nonce, the cluster label and the sealed header as
//! associated data) and opens every datagram it receives with whichever ring key the header's
//! key id names, before any decoding or decompression. A datagram that does not open costs the
//! header check and one Poly1305 tag check, and is reported as a typed [`OpenError`] whose
//! [`OpenError::kind`] is a stable label for counters.
//!
//! The pieces, from low to high level:
//! - [`Key`], [`KeyId`], [`Keyring`]: keys, their ids, one primary that seals, all that open;
//!   [`Keyring::parse_key_file`] reads the `--key-file` format.
//! - [`KeyringHandle`]: the ring a running transport reads once per datagram (one atomic load)
//!   and an operator rotates or replaces without stopping the node.
//! - [`SendSession`] and [`Stamp`]: the sender's random session id, counter and local time that
//!   every sealed header carries for replay protection.
//! - [`ReplayGuard`]: the receiver's bounded table of sessions that rejects duplicates and
//!   datagrams older than a window of the sender's own time; no clock sync needed.
//! - [`SealContext`]: all of the above for one endpoint, with [`SealContext::classify`], the one
//!   call a transport makes per received datagram, and the migration [`KeyedMode`].
//!
//! Format, threat model and procedures: `docs/keyed-clusters.md`.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use base64::Engine as _;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroize;

use super::MAX_DATAGRAM_LEN;

/// First two bytes of a sealed datagram. Chitchat's envelopes start with `53 B0` (magic 45139
/// LE); chitchat 0.13 and this crate's decoder reject any other magic, so they drop sealed
/// datagrams as foreign.
pub const SEAL_MAGIC: [u8; 2] = [0xC5, 0xEA];
/// First two bytes of a plaintext chitchat envelope (SPEC §3.1).
pub const CHITCHAT_MAGIC: [u8; 2] = [0x53, 0xB0];
/// The sealed format version this module writes and reads.
pub const SEAL_VERSION: u8 = 1;
/// Length of a key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a key id in bytes.
pub const KEY_ID_LEN: usize = 4;
/// Length of the XChaCha20 nonce in bytes.
pub const NONCE_LEN: usize = 24;
/// Length of the Poly1305 tag in bytes.
pub const TAG_LEN: usize = 16;
/// Most keys one ring holds: bounds the per-datagram key lookup and a key file.
pub const MAX_KEYS: usize = 16;

const OFF_VERSION: usize = 2;
const OFF_KEY_ID: usize = 3;
const OFF_SESSION: usize = OFF_KEY_ID + KEY_ID_LEN; // 7
const OFF_SEQ: usize = OFF_SESSION + 8; // 15
const OFF_TIME: usize = OFF_SEQ + 8; // 23
const OFF_NONCE: usize = OFF_TIME + 8; // 31
/// Length of the sealed header: magic, version, key id, session, seq, time, nonce.
pub const SEAL_HEADER_LEN: usize = OFF_NONCE + NONCE_LEN; // 55
/// Bytes a sealed datagram adds to its plaintext (header and tag).
pub const SEAL_OVERHEAD: usize = SEAL_HEADER_LEN + TAG_LEN; // 71
/// Largest plaintext that still seals into one UDP datagram (65 507 − [`SEAL_OVERHEAD`]).
pub const MAX_SEALED_PLAINTEXT: usize = MAX_DATAGRAM_LEN - SEAL_OVERHEAD;

const LABEL_DIGEST_LEN: usize = 32;
const AAD_LEN: usize = SEAL_HEADER_LEN + LABEL_DIGEST_LEN;

/// The plaintext budget left of a datagram budget once sealed: what the protocol may encode
/// into a datagram of at most `datagram_budget` bytes on the wire.
pub const fn plaintext_budget(datagram_budget: usize) -> usize {
    datagram_budget.saturating_sub(SEAL_OVERHEAD)
}

// ---------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------

/// The short public name of a key in sealed headers: the first 4 bytes of
/// SHA-256("chitchat-uring key id v1" ‖ key). Derived, so operators never assign ids by hand
/// and two nodes holding the same key always agree on its id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// A 32-byte cluster key. Its bytes are wiped on drop and never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Key([u8; KEY_LEN]);

impl Key {
    /// A key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Key {
        Key(bytes)
    }

    /// A fresh key from the operating system's random source.
    pub fn generate() -> Result<Key, KeyError> {
        use rand::TryRngCore as _;
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut bytes)
            .map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(Key(bytes))
    }

    /// Decodes standard base64 (with padding) of exactly 32 bytes; surrounding whitespace is
    /// ignored.
    pub fn from_base64(text: &str) -> Result<Key, KeyError> {
        let mut decoded = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| KeyError::NotBase64(e.to_string()))?;
        let key = <[u8; KEY_LEN]>::try_from(decoded.as_slice())
            .map(Key)
            .map_err(|_| KeyError::WrongLength(decoded.len()));
        decoded.zeroize();
        key
    }

    /// The key as one line of a key file.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// Its key id: the first 4 bytes of a domain-separated SHA-256 of the key.
    pub fn id(&self) -> KeyId {
        let digest = Sha256::new()
            .chain_update(b"chitchat-uring key id v1")
            .chain_update(self.0)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

impl Drop for Key {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}, <redacted>)", self.id())
    }
}

/// Why a text is not a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not standard base64: {0}")]
    /// The text is not standard padded base64 (the decoder's message).
    NotBase64(String),
    #[error("decodes to {0} bytes, a key is exactly 32")]
    /// Decoded to this many bytes instead of 32.
    WrongLength(usize),
    #[error("the operating system's random source failed: {0}")]
    /// The operating system's random source failed.
    Random(String),
}

/// Why a keyring operation was refused; the ring is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("a keyring needs at least one key")]
    /// A ring needs at least one key (the primary).
    Empty,
    #[error("a keyring holds at most {MAX_KEYS} keys")]
    /// The ring already holds `MAX_KEYS` keys.
    Full,
    #[error("key {0} is not in the keyring")]
    /// No key with this id is in the ring.
    UnknownKey(KeyId),
    #[error("key {0} is the primary and cannot be removed; switch the primary first")]
    /// The primary key cannot be removed: switch the primary first.
    RemovePrimary(KeyId),
    #[error("a different key with the same id {0} is already in the keyring; generate another key")]
    /// Another key of the ring has this id (generate another key).
    IdCollision(KeyId),
}

/// Why a key file was refused. Line numbers start at 1.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read key file {path}: {source}")]
    /// The key file could not be read.
    Io {
        /// The key file.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("key file {path} is {len} bytes, more than a key file can be ({max})")]
    /// The key file is larger than `max` bytes: refused before reading.
    TooBig {
        /// The key file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The limit.
        max: u64,
    },
    #[error("line {line}: {problem}")]
    /// A line of the key file is not a usable key.
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: KeyLineProblem,
    },
    #[error("the key file holds no key (only blank lines and # comments)")]
    /// The file holds no key (only blank lines and comments).
    NoKeys,
}

/// What is wrong with one line of a key file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyLineProblem {
    #[error("{0}")]
    /// Not a 32-byte base64 key.
    BadKey(KeyError),
    #[error("the same key as line {first_line}")]
    /// The same key as an earlier line.
    Duplicate {
        /// The line that has it first.
        first_line: usize,
    },
    #[error("a different key with the same id as line {first_line}; generate another key")]
    /// A different key with the same id as an earlier line.
    IdCollision {
        /// The line whose key has that id.
        first_line: usize,
    },
    #[error("more than {MAX_KEYS} keys")]
    /// More than `MAX_KEYS` keys.
    TooMany,
    #[error("{0}")]
    /// The ring refused the key.
    Ring(KeyringError),
}

/// Largest key file read: far above 16 keys with comments, small enough to never matter.
const MAX_KEY_FILE_LEN: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Keyring
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct RingKey {
    id: KeyId,
    key: Key,
    /// Keyed cipher state built once per key, not per datagram (zeroized on drop by the crate).
    cipher: XChaCha20Poly1305,
}

impl RingKey {
    fn new(key: Key) -> RingKey {
        let cipher = XChaCha20Poly1305::new((&key.0).into());
        RingKey {
            id: key.id(),
            key,
            cipher,
        }
    }
}

/// One primary key that seals and up to [`MAX_KEYS`] keys that open. A value: rotate it through
/// a [`KeyringHandle`] on a running node.
#[derive(Clone)]
pub struct Keyring {
    /// Index 0 is the primary. A handful of entries: a receiver scans them by id.
    keys: Vec<RingKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("primary", &self.primary_id())
            .field("keys", &self.key_ids().collect::<Vec<_>>())
            .finish()
    }
}

impl Keyring {
    /// A ring of one key, the primary.
    pub fn new(primary: Key) -> Keyring {
        Keyring {
            keys: vec![RingKey::new(primary)],
        }
    }

    /// A ring of `keys`, the first being the primary. Installing the same key twice is harmless.
    pub fn from_keys(keys: impl IntoIterator<Item = Key>) -> Result<Keyring, KeyringError> {
        let mut keys = keys.into_iter();
        let mut ring = Keyring::new(keys.next().ok_or(KeyringError::Empty)?);
        for key in keys {
            ring.install(key)?;
        }
        Ok(ring)
    }

    /// Parses a key file: one standard-base64 32-byte key per line, the first the primary;
    /// blank lines and lines starting with `#` are ignored, surrounding whitespace (and CR) too.
    pub fn parse_key_file(text: &str) -> Result<Keyring, KeyFileError> {
        let mut ring: Option<Keyring> = None;
        let mut lines_of: Vec<(KeyId, usize)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fail = |problem| KeyFileError::Line { line, problem };
            let key = Key::from_base64(trimmed).map_err(|e| fail(KeyLineProblem::BadKey(e)))?;
            let id = key.id();
            if let Some(&(_, first_line)) = lines_of.iter().find(|(i, _)| *i == id) {
                let same = ring
                    .as_ref()
                    .and_then(|r| r.find(id))
                    .is_some_and(|k| k.key == key);
                return Err(fail(if same {
                    KeyLineProblem::Duplicate { first_line }
                } else {
                    KeyLineProblem::IdCollision { first_line }
                }));
            }
            match &mut ring {
                None => ring = Some(Keyring::new(key)),
                Some(ring) => {
                    ring.install(key).map_err(|e| {
                        fail(match e {
                            KeyringError::Full => KeyLineProblem::TooMany,
                            other => KeyLineProblem::Ring(other),
                        })
                    })?;
                }
            }
            lines_of.push((id, line));
        }
        ring.ok_or(KeyFileError::NoKeys)
    }

    /// Reads and parses a key file (see [`Keyring::parse_key_file`]).
    pub fn load_key_file(path: &Path) -> Result<Keyring, KeyFileError> {
        let io = |source| KeyFileError::Io {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_KEY_FILE_LEN {
            return Err(KeyFileError::TooBig {
                path: path.to_owned(),
                len,
                max: MAX_KEY_FILE_LEN,
            });
        }
        let mut text = std::fs::read_to_string(path).map_err(io)?;
        let ring = Keyring::parse_key_file(&text);
        text.zeroize();
        ring
    }

    /// The id of the key that seals.
    pub fn primary_id(&self) -> KeyId {
        self.keys[0].id
    }

    /// Ids of all keys, the primary first.
    pub fn key_ids(&self) -> impl Iterator<Item = KeyId> + '_ {
        self.keys.iter().map(|k| k.id)
    }

    /// How many keys open (the primary included).
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a ring has a primary. Present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a key with this id is in the ring.
    pub fn contains(&self, id: KeyId) -> bool {
        self.find(id).is_some()
    }

    /// Adds an opening key (step 1 of a rotation). Installing a key already present is a no-op.
    pub fn install(&mut self, key: Key) -> Result<KeyId, KeyringError> {
        let id = key.id();
        if let Some(existing) = self.find(id) {
            return if existing.key == key {
                Ok(id)
            } else {
                Err(KeyringError::IdCollision(id))
            };
        }
        if self.keys.len() >= MAX_KEYS {
            return Err(KeyringError::Full);
        }
        self.keys.push(RingKey::new(key));
        Ok(id)
    }

    /// Makes an installed key the sealing key (step 2 of a rotation).
    pub fn set_primary(&mut self, id: KeyId) -> Result<(), KeyringError> {
        let index = self
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or(KeyringError::UnknownKey(id))?;
        // Keep the others in order: the old primary becomes the first secondary.
        self.keys[..=index].rotate_right(1);
        Ok(())
    }

    /// Removes an opening key (step 3 of a rotation). The primary cannot be removed.
    pub fn remove(&mut self, id: KeyId) -> Result<(), KeyringError> {
        if self.primary_id() == id {
            return Err(KeyringError::RemovePrimary(id));
        }
        let index = self
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or(KeyringError::UnknownKey(id))?;
        self.keys.remove(index);
        Ok(())
    }

    fn find(&self, id: KeyId) -> Option<&RingKey> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Seals `buf`, which holds [`SEAL_HEADER_LEN`] reserved bytes (see [`reserve_header`])
    /// followed by the plaintext: writes the header in front and appends the tag. No allocation
    /// when `buf` has room for [`TAG_LEN`] more bytes.
    pub fn seal_reserved(
        &self,
        label: &ClusterLabel,
        stamp: Stamp,
        buf: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        let plaintext_len = buf
            .len()
            .checked_sub(SEAL_HEADER_LEN)
            .ok_or(SealError::NoHeaderRoom { len: buf.len() })?;
        if plaintext_len > MAX_SEALED_PLAINTEXT {
            return Err(SealError::TooLarge {
                len: plaintext_len,
                max: MAX_SEALED_PLAINTEXT,
            });
        }
        let primary = &self.keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let header = &mut buf[..SEAL_HEADER_LEN];
        header[..2].copy_from_slice(&SEAL_MAGIC);
        header[OFF_VERSION] = SEAL_VERSION;
        header[OFF_KEY_ID..OFF_SESSION].copy_from_slice(&primary.id.0);
        header[OFF_SESSION..OFF_SEQ].copy_from_slice(&stamp.session.to_le_bytes());
        header[OFF_SEQ..OFF_TIME].copy_from_slice(&stamp.seq.to_le_bytes());
        header[OFF_TIME..OFF_NONCE].copy_from_slice(&stamp.time_ms.to_le_bytes());
        header[OFF_NONCE..].copy_from_slice(&nonce);
        let aad = associated_data(header, label);
        let tag = primary
            .cipher
            .encrypt_in_place_detached(
                XNonce::from_slice(&nonce),
                &aad,
                &mut buf[SEAL_HEADER_LEN..],
            )
            .map_err(|_| SealError::TooLarge {
                len: plaintext_len,
                max: MAX_SEALED_PLAINTEXT,
            })?;
        buf.extend_from_slice(&tag);
        Ok(())
    }

    /// Seals `buf`, which holds only the plaintext: moves it up by [`SEAL_HEADER_LEN`] bytes.
    /// Prefer [`Keyring::seal_reserved`] where the encoder can leave room for the header.
    pub fn seal_in_place(
        &self,
        label: &ClusterLabel,
        stamp: Stamp,
        buf: &mut Vec<u8>,
    ) -> Result<(), SealError> {
        if buf.len() > MAX_SEALED_PLAINTEXT {
            return Err(SealError::TooLarge {
                len: buf.len(),
                max: MAX_SEALED_PLAINTEXT,
            });
        }
        let len = buf.len();
        buf.resize(len + SEAL_HEADER_LEN, 0);
        buf.copy_within(..len, SEAL_HEADER_LEN);
        self.seal_reserved(label, stamp, buf)
    }

    /// Opens a sealed datagram in place: checks the header, finds the key by id, verifies the
    /// tag and only then decrypts. Returns where the plaintext now is and the sender's stamp;
    /// replay is checked separately ([`ReplayGuard::check`]) since only authentic stamps may
    /// enter the guard's table.
    pub fn open_in_place(&self, label: &ClusterLabel, buf: &mut [u8]) -> Result<Opened, OpenError> {
        let header = parse_header(buf)?;
        let key = self.find(header.key_id).ok_or(OpenError::UnknownKey)?;
        let len = buf.len();
        let (head, rest) = buf.split_at_mut(SEAL_HEADER_LEN);
        let (ciphertext, tag) = rest.split_at_mut(len - SEAL_OVERHEAD);
        let aad = associated_data(head, label);
        let nonce = XNonce::from_slice(&head[OFF_NONCE..]);
        key.cipher
            .decrypt_in_place_detached(nonce, &aad, ciphertext, Tag::from_slice(tag))
            .map_err(|_| OpenError::BadTag)?;
        Ok(Opened {
            plaintext: SEAL_HEADER_LEN..len - TAG_LEN,
            stamp: header.stamp,
            key_id: header.key_id,
        })
    }
}

/// Clears `buf` and reserves the sealed header in front, so an encoder appends the plaintext
/// right after it and [`Keyring::seal_reserved`] needs no move.
pub fn reserve_header(buf: &mut Vec<u8>) {
    buf.clear();
    buf.resize(SEAL_HEADER_LEN, 0);
}

/// The authenticated header followed by the label's digest: a fixed-size stack value, so
/// binding the label costs no allocation.
fn associated_data(header: &[u8], label: &ClusterLabel) -> [u8; AAD_LEN] {
    let mut aad = [0u8; AAD_LEN];
    aad[..SEAL_HEADER_LEN].copy_from_slice(&header[..SEAL_HEADER_LEN]);
    aad[SEAL_HEADER_LEN..].copy_from_slice(&label.digest);
    aad
}

struct Header {
    key_id: KeyId,
    stamp: Stamp,
}

fn parse_header(buf: &[u8]) -> Result<Header, OpenError> {
    if buf.len() < 2 || buf[..2] != SEAL_MAGIC {
        return Err(OpenError::NotSealed);
    }
    match buf.get(OFF_VERSION) {
        None => return Err(OpenError::Truncated),
        Some(&SEAL_VERSION) => {}
        Some(&other) => return Err(OpenError::BadVersion(other)),
    }
    if buf.len() < SEAL_OVERHEAD {
        return Err(OpenError::Truncated);
    }
    let u64_at = |off: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&buf[off..off + 8]);
        u64::from_le_bytes(b)
    };
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&buf[OFF_KEY_ID..OFF_SESSION]);
    Ok(Header {
        key_id: KeyId(key_id),
        stamp: Stamp {
            session: u64_at(OFF_SESSION),
            seq: u64_at(OFF_SEQ),
            time_ms: u64_at(OFF_TIME),
        },
    })
}

/// A sealed datagram that opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Where the decrypted plaintext is in the buffer given to `open_in_place`.
    pub plaintext: Range<usize>,
    /// The sender's replay stamp (session, sequence, sender time).
    pub stamp: Stamp,
    /// The ring key that opened it.
    pub key_id: KeyId,
}

/// Why a plaintext was not sealed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("plaintext of {len} bytes exceeds the sealed budget of {max} bytes")]
    /// The plaintext is `len` bytes, more than the `max` that fits one sealed datagram.
    TooLarge {
        /// The plaintext's length.
        len: usize,
        /// The largest that fits.
        max: usize,
    },
    #[error("buffer of {len} bytes has no room reserved for the sealed header")]
    /// The buffer (`len` bytes) is shorter than the reserved header.
    NoHeaderRoom {
        /// The buffer's length.
        len: usize,
    },
}

/// Why a received datagram did not open. `kind()` is a stable counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not a sealed datagram (foreign magic)")]
    /// Does not start with the sealed magic.
    NotSealed,
    #[error("sealed format version {0} is not supported")]
    /// Sealed with a format version this node does not know.
    BadVersion(u8),
    #[error("shorter than a sealed header and tag")]
    /// Shorter than a sealed header and tag.
    Truncated,
    #[error("sealed under a key this node does not hold")]
    /// The key id names no key of the ring.
    UnknownKey,
    #[error("authentication failed (wrong key, other cluster or tampered)")]
    /// The Poly1305 tag does not verify: wrong key, another cluster, or tampered.
    BadTag,
    #[error("already received (replay)")]
    /// Its sequence number was already accepted from that session.
    Replayed,
    #[error("older than the replay window of its sender")]
    /// Older than the replay window behind its session's newest datagram.
    TooOld,
}

impl OpenError {
    /// A stable label for counters and logs (`bad_tag`, `replayed`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            OpenError::NotSealed => "not_sealed",
            OpenError::BadVersion(_) => "bad_version",
            OpenError::Truncated => "truncated",
            OpenError::UnknownKey => "unknown_key",
            OpenError::BadTag => "bad_tag",
            OpenError::Replayed => "replayed",
            OpenError::TooOld => "too_old",
        }
    }
}

/// The cluster id as bound into every seal: its SHA-256, computed once, so a datagram sealed for
/// another cluster never opens even under the same key.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterLabel {
    digest: [u8; LABEL_DIGEST_LEN],
}

impl ClusterLabel {
    /// The label of the cluster `cluster_id` (hashed once).
    pub fn new(cluster_id: &str) -> ClusterLabel {
        let digest = Sha256::new()
            .chain_update(b"chitchat-uring cluster label v1\0")
            .chain_update(cluster_id.as_bytes())
            .finalize();
        let mut d = [0u8; LABEL_DIGEST_LEN];
        d.copy_from_slice(&digest);
        ClusterLabel { digest: d }
    }
}

impl fmt::Debug for ClusterLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClusterLabel({:02x?}…)", &self.digest[..4])
    }
}

// ---------------------------------------------------------------------------------------------
// Shared, swappable keyring
// ---------------------------------------------------------------------------------------------

/// The keyring of a running node: transports read it once per datagram with one atomic load
/// ([`KeyringHandle::load`]); rotations publish a new ring atomically. Readers never block and
/// never see a half-updated ring; concurrent updates are serialised.
pub struct KeyringHandle {
    current: ArcSwap<Keyring>,
    updates: Mutex<()>,
}

impl fmt::Debug for KeyringHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("KeyringHandle")
            .field(&**self.current.load())
            .finish()
    }
}

/// A borrowed view of the current ring, valid while held; cheap, for one datagram or batch.
pub type KeyringGuard = arc_swap::Guard<Arc<Keyring>>;

impl KeyringHandle {
    /// A shared handle on `ring`.
    pub fn new(ring: Keyring) -> Arc<KeyringHandle> {
        Arc::new(KeyringHandle {
            current: ArcSwap::from_pointee(ring),
            updates: Mutex::new(()),
        })
    }

    /// The current ring, for a datagram or a batch (do not hold it for long).
    pub fn load(&self) -> KeyringGuard {
        self.current.load()
    }

    /// The current ring as an owned snapshot.
    pub fn snapshot(&self) -> Arc<Keyring> {
        self.current.load_full()
    }

    /// Replaces the whole ring (e.g. a re-read key file).
    pub fn replace(&self, ring: Keyring) {
        let _serial = self.updates.lock();
        self.current.store(Arc::new(ring));
    }

    /// Applies `change` to a copy of the current ring and publishes it if it succeeds.
    pub fn update<T>(
        &self,
        change: impl FnOnce(&mut Keyring) -> Result<T, KeyringError>,
    ) -> Result<T, KeyringError> {
        let _serial = self.updates.lock();
        let mut ring = Keyring::clone(&self.current.load());
        let out = change(&mut ring)?;
        self.current.store(Arc::new(ring));
        Ok(out)
    }

    /// Installs `key` on the running node (it opens at once; sealing is unchanged).
    pub fn install(&self, key: Key) -> Result<KeyId, KeyringError> {
        self.update(|r| r.install(key))
    }

    /// Makes the ring key `id` the one that seals.
    pub fn set_primary(&self, id: KeyId) -> Result<(), KeyringError> {
        self.update(|r| r.set_primary(id))
    }

    /// Removes the ring key `id` (not the primary).
    pub fn remove(&self, id: KeyId) -> Result<(), KeyringError> {
        self.update(|r| r.remove(id))
    }
}

// ---------------------------------------------------------------------------------------------
// Replay protection
// ---------------------------------------------------------------------------------------------

/// What a sealed header says about its sender, authenticated with the datagram: a random id of
/// the sending process's session, a counter strictly increasing within the session, and the
/// sender's own monotonic time since the session began (never compared with the receiver's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// The sender's random session id.
    pub session: u64,
    /// Its sequence number within the session.
    pub seq: u64,
    /// The sender's monotonic time since the session began, in ms.
    pub time_ms: u64,
}

/// The sender side of replay protection: one per sending endpoint (or process), shared by its
/// worker threads (one atomic increment per datagram).
#[derive(Debug)]
pub struct SendSession {
    session: u64,
    next_seq: AtomicU64,
    started: Instant,
}

impl Default for SendSession {
    fn default() -> Self {
        SendSession::new()
    }
}

impl SendSession {
    /// A session with a fresh random id, counting from 0.
    pub fn new() -> SendSession {
        SendSession {
            session: rand::random(),
            next_seq: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// The session's random id.
    pub fn id(&self) -> u64 {
        self.session
    }

    /// The stamp of the next datagram sent.
    pub fn next_stamp(&self) -> Stamp {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let time_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        Stamp {
            session: self.session,
            seq,
            time_ms,
        }
    }
}

/// Datagrams per session remembered exactly: a later one more than this many sequence numbers
/// behind the newest seen is rejected as too old.
pub const REPLAY_WINDOW_SEQS: u64 = 512;
const BITMAP_WORDS: usize = (REPLAY_WINDOW_SEQS / 64) as usize;
const SHARDS: usize = 16;

/// Limits of a [`ReplayGuard`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayConfig {
    /// Sessions remembered (least recently used evicted first), over all shards.
    pub max_sessions: usize,
    /// A datagram whose sender time is this much behind the newest sender time seen from its
    /// session is rejected.
    pub window: Duration,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        ReplayConfig {
            max_sessions: 4096,
            window: Duration::from_secs(30),
        }
    }
}

/// The receiver side of replay protection: per sender session, the highest sequence number and
/// sender time seen and a bitmap of the last [`REPLAY_WINDOW_SEQS`] sequence numbers. No clock
/// of the receiver is involved. Thread-safe (sessions are spread over 16 mutex-protected
/// shards), so one guard serves all worker threads of an endpoint; memory is bounded by
/// `max_sessions` (about 130 bytes each).
pub struct ReplayGuard {
    shards: Vec<Mutex<Lru>>,
    window_ms: u64,
    per_shard: usize,
}

impl fmt::Debug for ReplayGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplayGuard")
            .field("sessions", &self.len())
            .field("window_ms", &self.window_ms)
            .finish()
    }
}

impl Default for ReplayGuard {
    fn default() -> Self {
        ReplayGuard::new(ReplayConfig::default())
    }
}

impl ReplayGuard {
    /// A guard with `config`'s capacity and window.
    pub fn new(config: ReplayConfig) -> ReplayGuard {
        let per_shard = config.max_sessions.div_ceil(SHARDS).max(1);
        ReplayGuard {
            shards: (0..SHARDS).map(|_| Mutex::new(Lru::default())).collect(),
            window_ms: u64::try_from(config.window.as_millis()).unwrap_or(u64::MAX),
            per_shard,
        }
    }

    /// Accepts `stamp` (and remembers it) or rejects it as a duplicate or too old. Call it only
    /// with stamps of datagrams that opened, so no outsider can fill the table.
    pub fn check(&self, stamp: &Stamp) -> Result<(), OpenError> {
        // Session ids are random: their low bits spread sessions evenly.
        let shard = &self.shards[(stamp.session as usize) % SHARDS];
        let mut lru = shard.lock();
        match lru.get_mut(stamp.session) {
            Some(state) => state.accept(stamp, self.window_ms),
            None => {
                lru.insert(stamp.session, SessionWindow::first(stamp), self.per_shard);
                Ok(())
            }
        }
    }

    /// Sessions currently remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether no session is tracked yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most sessions this guard remembers.
    pub fn capacity(&self) -> usize {
        self.per_shard * SHARDS
    }
}

#[derive(Debug, Clone)]
struct SessionWindow {
    max_seq: u64,
    max_time_ms: u64,
    /// Bit i set: sequence number `max_seq - i` was accepted.
    seen: [u64; BITMAP_WORDS],
}

impl SessionWindow {
    fn first(stamp: &Stamp) -> SessionWindow {
        let mut seen = [0u64; BITMAP_WORDS];
        seen[0] = 1;
        SessionWindow {
            max_seq: stamp.seq,
            max_time_ms: stamp.time_ms,
            seen,
        }
    }

    fn accept(&mut self, stamp: &Stamp, window_ms: u64) -> Result<(), OpenError> {
        if stamp.time_ms.saturating_add(window_ms) < self.max_time_ms {
            return Err(OpenError::TooOld);
        }
        if stamp.seq > self.max_seq {
            shift_older(&mut self.seen, stamp.seq - self.max_seq);
            self.seen[0] |= 1;
            self.max_seq = stamp.seq;
        } else {
            let behind = self.max_seq - stamp.seq;
            if behind >= REPLAY_WINDOW_SEQS {
                return Err(OpenError::TooOld);
            }
            let (word, bit) = ((behind / 64) as usize, behind % 64);
            if self.seen[word] & (1 << bit) != 0 {
                return Err(OpenError::Replayed);
            }
            self.seen[word] |= 1 << bit;
        }
        self.max_time_ms = self.max_time_ms.max(stamp.time_ms);
        Ok(())
    }
}

/// Moves every remembered bit `by` positions towards "older" (a 512-bit left shift).
fn shift_older(seen: &mut [u64; BITMAP_WORDS], by: u64) {
    if by >= REPLAY_WINDOW_SEQS {
        *seen = [0; BITMAP_WORDS];
        return;
    }
    let words = (by / 64) as usize;
    let bits = (by % 64) as u32;
    for j in (0..BITMAP_WORDS).rev() {
        let mut v = 0;
        if j >= words {
            v = seen[j - words] << bits;
            if bits > 0 && j > words {
                v |= seen[j - words - 1] >> (64 - bits);
            }
        }
        seen[j] = v;
    }
}

/// A least-recently-used map of sessions: a slab of nodes in a doubly linked recency list, and
/// an index from session id to slot. All operations O(1).
struct Lru {
    index: HashMap<u64, u32>,
    nodes: Vec<LruNode>,
    /// Most recently used, or NIL.
    head: u32,
    /// Least recently used, or NIL.
    tail: u32,
}

impl Default for Lru {
    fn default() -> Self {
        Lru {
            index: HashMap::new(),
            nodes: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }
}

struct LruNode {
    session: u64,
    window: SessionWindow,
    prev: u32,
    next: u32,
}

const NIL: u32 = u32::MAX;

impl Lru {
    fn len(&self) -> usize {
        self.index.len()
    }

    fn get_mut(&mut self, session: u64) -> Option<&mut SessionWindow> {
        let slot = *self.index.get(&session)?;
        self.unlink(slot);
        self.push_front(slot);
        Some(&mut self.nodes[slot as usize].window)
    }

    fn insert(&mut self, session: u64, window: SessionWindow, capacity: usize) {
        if self.index.len() >= capacity && self.tail != NIL {
            // Reuse the least recently used slot.
            let slot = self.tail;
            self.unlink(slot);
            let node = &mut self.nodes[slot as usize];
            self.index.remove(&node.session);
            node.session = session;
            node.window = window;
            self.index.insert(session, slot);
            self.push_front(slot);
            return;
        }
        let slot = self.nodes.len() as u32;
        self.nodes.push(LruNode {
            session,
            window,
            prev: NIL,
            next: NIL,
        });
        self.index.insert(session, slot);
        self.push_front(slot);
    }

    fn unlink(&mut self, slot: u32) {
        let (prev, next) = {
            let n = &self.nodes[slot as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
        let n = &mut self.nodes[slot as usize];
        n.prev = NIL;
        n.next = NIL;
    }

    fn push_front(&mut self, slot: u32) {
        let old_head = self.head;
        {
            let n = &mut self.nodes[slot as usize];
            n.prev = NIL;
            n.next = old_head;
        }
        match old_head {
            NIL => self.tail = slot,
            h => self.nodes[h as usize].prev = slot,
        }
        self.head = slot;
    }
}

// ---------------------------------------------------------------------------------------------
// Endpoint context and classification
// ---------------------------------------------------------------------------------------------

/// Whether a keyed endpoint accepts plaintext chitchat datagrams. It always sends sealed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyedMode {
    /// Only sealed datagrams are accepted (the default).
    #[default]
    Required,
    /// Plaintext chitchat datagrams are accepted too: for turning keys on in a running cluster.
    AcceptPlaintext,
}

/// What a transport does with a received datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Opened: the plaintext envelope is at this range of the buffer.
    Sealed(Range<usize>),
    /// A plaintext chitchat envelope, accepted in [`KeyedMode::AcceptPlaintext`]: decode it as is.
    Plaintext,
    /// Drop it and count `reason.kind()`.
    Rejected(Reject),
}

/// Why [`SealContext::classify`] rejected a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("{0}")]
    /// It did not open (or was replayed).
    Open(OpenError),
    #[error("plaintext chitchat datagram refused in keyed mode")]
    /// A plaintext chitchat datagram while plaintext is not accepted.
    PlaintextRefused,
    #[error("neither sealed nor chitchat")]
    /// Neither sealed nor a chitchat envelope.
    Foreign,
}

impl Reject {
    /// A stable counter label: [`OpenError::kind`], `plaintext_refused` or `foreign`.
    pub fn kind(&self) -> &'static str {
        match self {
            Reject::Open(e) => e.kind(),
            Reject::PlaintextRefused => "plaintext_refused",
            Reject::Foreign => "foreign",
        }
    }
}

/// Everything one keyed endpoint needs: the shared keyring, the cluster label, the migration
/// mode, the sending session and the replay guard. `Send + Sync`: one per endpoint, shared by its
/// worker threads.
#[derive(Debug)]
pub struct SealContext {
    keyring: Arc<KeyringHandle>,
    label: ClusterLabel,
    mode: AtomicU8,
    session: SendSession,
    replay: ReplayGuard,
}

impl SealContext {
    /// The context of one endpoint of a node in `cluster_id`, with a fresh sending session and replay guard.
    pub fn new(keyring: Arc<KeyringHandle>, cluster_id: &str, mode: KeyedMode) -> SealContext {
        SealContext {
            keyring,
            label: ClusterLabel::new(cluster_id),
            mode: AtomicU8::new(mode as u8),
            session: SendSession::new(),
            replay: ReplayGuard::default(),
        }
    }

    /// The same context with another replay table size or window.
    pub fn with_replay_config(mut self, config: ReplayConfig) -> SealContext {
        self.replay = ReplayGuard::new(config);
        self
    }

    /// The shared keyring (rotate through it).
    pub fn keyring(&self) -> &Arc<KeyringHandle> {
        &self.keyring
    }

    /// The cluster label bound into every seal.
    pub fn label(&self) -> &ClusterLabel {
        &self.label
    }

    /// The current migration mode.
    pub fn mode(&self) -> KeyedMode {
        if self.mode.load(Ordering::Relaxed) == KeyedMode::AcceptPlaintext as u8 {
            KeyedMode::AcceptPlaintext
        } else {
            KeyedMode::Required
        }
    }

    /// Ends (or restarts) a migration on a running node.
    pub fn set_mode(&self, mode: KeyedMode) {
        self.mode.store(mode as u8, Ordering::Relaxed);
    }

    /// The endpoint's replay guard.
    pub fn replay_guard(&self) -> &ReplayGuard {
        &self.replay
    }

    /// Seals a buffer holding the reserved header and the plaintext ([`reserve_header`]).
    pub fn seal_reserved(&self, buf: &mut Vec<u8>) -> Result<(), SealError> {
        self.keyring
            .load()
            .seal_reserved(&self.label, self.session.next_stamp(), buf)
    }

    /// Seals a buffer holding only the plaintext (moves it up by the header).
    pub fn seal_in_place(&self, buf: &mut Vec<u8>) -> Result<(), SealError> {
        self.keyring
            .load()
            .seal_in_place(&self.label, self.session.next_stamp(), buf)
    }

    /// Opens a sealed datagram and checks it against replay; returns the plaintext range.
    pub fn open_in_place(&self, buf: &mut [u8]) -> Result<Range<usize>, OpenError> {
        let opened = self.keyring.load().open_in_place(&self.label, buf)?;
        self.replay.check(&opened.stamp)?;
        Ok(opened.plaintext)
    }

    /// The transport's one call per received datagram, before any decoding.
    pub fn classify(&self, buf: &mut [u8]) -> Received {
        if buf.len() >= 2 && buf[..2] == CHITCHAT_MAGIC {
            return match self.mode() {
                KeyedMode::AcceptPlaintext => Received::Plaintext,
                KeyedMode::Required => Received::Rejected(Reject::PlaintextRefused),
            };
        }
        match self.open_in_place(buf) {
            Ok(range) => Received::Sealed(range),
            Err(OpenError::NotSealed) => Received::Rejected(Reject::Foreign),
            Err(e) => Received::Rejected(Reject::Open(e)),
        }
    }
}

#[cfg(test)]
mod tests;

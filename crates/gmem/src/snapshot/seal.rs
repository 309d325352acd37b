//! Sealing private pages: XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`)
//! under the caller's 256-bit key. Nonces are the snapshot's random 128-bit
//! id followed by the record's index, so no nonce repeats within a snapshot
//! and, with overwhelming probability, across snapshots under one key. Each
//! record's header (kind, length, GPA) and index are its associated data,
//! so a record cannot be moved, cut or renumbered; the stream's header is
//! authenticated by a tag of its own.

use chacha20poly1305::XChaCha20Poly1305;
use chacha20poly1305::aead::{AeadInOut, KeyInit};

use super::format::TAG;

/// A 256-bit sealing key. Its `Debug` shows no byte of it.
#[derive(Clone)]
pub struct SealKey([u8; 32]);

impl SealKey {
    /// A key from its 32 bytes (a `--key FILE` holds exactly these).
    pub fn new(bytes: [u8; 32]) -> SealKey {
        SealKey(bytes)
    }

    /// A key from a slice.
    ///
    /// # Errors
    /// The slice's length, unless it is 32.
    pub fn from_slice(bytes: &[u8]) -> Result<SealKey, usize> {
        <[u8; 32]>::try_from(bytes)
            .map(SealKey)
            .map_err(|_| bytes.len())
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// The nonce index of the header's tag (no record has it).
pub(crate) const HEADER_INDEX: u64 = u64::MAX;

/// A key in use for one snapshot.
pub(crate) struct Sealer {
    cipher: XChaCha20Poly1305,
    id: [u8; 16],
}

impl Sealer {
    pub(crate) fn new(key: &SealKey, id: [u8; 16]) -> Sealer {
        Sealer {
            cipher: XChaCha20Poly1305::new(&key.0.into()),
            id,
        }
    }

    fn nonce(&self, index: u64) -> chacha20poly1305::XNonce {
        let mut n = [0u8; 24];
        n[..16].copy_from_slice(&self.id);
        n[16..].copy_from_slice(&index.to_le_bytes());
        n.into()
    }

    /// Encrypts `buf` in place; its tag.
    pub(crate) fn seal(&self, index: u64, aad: &[u8], buf: &mut [u8]) -> [u8; TAG] {
        let tag = self
            .cipher
            .encrypt_inout_detached(&self.nonce(index), aad, buf.into())
            // XChaCha20-Poly1305 refuses only messages past 2^38 bytes; a
            // record is at most one chunk.
            .unwrap_or_default();
        tag.into()
    }

    /// Decrypts `buf` in place; false (and `buf` unusable) if the tag does
    /// not authenticate it and `aad`.
    pub(crate) fn open(&self, index: u64, aad: &[u8], buf: &mut [u8], tag: &[u8; TAG]) -> bool {
        self.cipher
            .decrypt_inout_detached(&self.nonce(index), aad, buf.into(), tag.into())
            .is_ok()
    }
}
